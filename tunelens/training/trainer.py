"""The stage's SFTTrainer: TRL's, without the host syncs it pays on every micro-batch for its logged metrics.

TRL 1.16's `SFTTrainer.compute_loss` turns three metrics into Python floats on every micro-batch (entropy and token
accuracy with `.item()`, its token count with `.item()`), and transformers' Trainer adds two more per micro-batch
(the non-padding token count, `include_num_input_tokens_seen`, from the attention mask or, for packed rows, the
tokens that are not padding; the NaN/inf filter of the logged loss,
`logging_nan_inf_filter`). Each makes the CPU wait until the GPU has run everything queued, so the CPU cannot queue
the next kernels while the GPU works. Here the same values are kept on the device and turned into numbers only when
a row is logged or a checkpoint saved: the loss, the gradients and every logged value are the same as TRL's (tests
compare the logs). Used only on the path tunelens trains on (one process, TRL's default loss); anything else falls
back to TRL's own code.
"""

from __future__ import annotations

_CLASS = None


def sft_trainer_class():
    """SFTTrainer subclass with device-side metric accumulation (built on first use: importing TRL is slow)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import torch
    from trl import SFTTrainer

    class SyncFreeSFTTrainer(SFTTrainer):
        _pending_metrics: list | None = None  # per micro-batch [entropy mean, accuracy, tokens], on the device
        _pending_input_tokens = None  # non-padding input tokens not yet added to state.num_input_tokens_seen

        def _sync_free(self, return_outputs: bool) -> bool:
            return (not return_outputs and self.model.training and self.accelerator.num_processes == 1
                    and self.compute_loss_func is None and self.label_smoother is None
                    and self.args.loss_type == "nll" and not self.aux_loss_enabled)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._sync_free(return_outputs):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            inputs["use_cache"] = False
            # TRL's default path, operation for operation (so the loss and its gradient are bit-identical).
            outputs = model(**inputs, fused_lm_head=True)
            per_token_loss = -outputs.log_probs
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            with torch.no_grad():
                num_valid = outputs.label_mask.sum()
                scale = (num_valid > 0) / num_valid.clamp(min=1)  # TRL logs 0.0 when no token is valid
                if "attention_mask" in inputs:
                    batch_tokens = inputs["attention_mask"].sum()
                elif "position_ids" in inputs:
                    # TRL: torch.tensor(size, device=...), a blocking host-to-device copy (a sync on a GPU); a fill is not
                    batch_tokens = torch.full((), inputs["position_ids"].size(1), device=num_valid.device)
                else:
                    raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
                entry = torch.stack([outputs.entropy.detach().sum().float() * scale,
                                     outputs.is_top1.sum().float() * scale, batch_tokens.float()])
            if self._pending_metrics is None:
                self._pending_metrics = []
            self._pending_metrics.append(entry)
            return loss

        def _flush_metrics(self) -> None:
            """Turn the pending device values into the numbers TRL would have logged (one sync)."""
            if self._pending_metrics:
                values = torch.stack(self._pending_metrics).tolist()
                self._pending_metrics = []
                metrics = self._metrics["train"]
                for entropy, accuracy, tokens in values:
                    metrics["entropy"].append(entropy)
                    metrics["mean_token_accuracy"].append(accuracy)
                    self._total_train_tokens += int(tokens) // self._tp_size
                metrics["num_tokens"] = [self._total_train_tokens]
            if self._pending_input_tokens is not None:
                self.state.num_input_tokens_seen += int(self._pending_input_tokens.item())
                self._pending_input_tokens = None

        def _non_padding_tokens(self, inputs):
            """transformers' count of a micro-batch's non-padding input tokens, left on the device; None where
            its own code must count (other counting modes, several processes, no way to tell padding)."""
            if self.args.include_num_input_tokens_seen != "non_padding" or self.accelerator.num_processes != 1:
                return None
            if "attention_mask" in inputs:
                return inputs["attention_mask"].sum()
            # Packed sequences as rows carry no attention mask (speed.packed_sequences_as_rows): the Trainer then
            # counts the tokens that are not the pad token, as here, but reads the count back on every micro-batch.
            main_input_name = getattr(self.model, "main_input_name", "input_ids")
            pad_token_id = getattr(self.processing_class, "pad_token_id", None)
            if main_input_name in inputs and pad_token_id is not None:
                return (inputs[main_input_name] != pad_token_id).sum()
            return None

        def _track_num_input_tokens(self, inputs):
            count = self._non_padding_tokens(inputs)
            if count is None:
                self._flush_metrics()  # keep the order of additions
                return super()._track_num_input_tokens(inputs)
            self._pending_input_tokens = count if self._pending_input_tokens is None else self._pending_input_tokens + count

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            if self.control.should_log or self.control.should_save or self.control.should_evaluate:
                self._flush_metrics()
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def log(self, logs, start_time=None):
            self._flush_metrics()
            return super().log(logs, start_time)

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            finally:
                self._flush_metrics()

    _CLASS = SyncFreeSFTTrainer
    return _CLASS

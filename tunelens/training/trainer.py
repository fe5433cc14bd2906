"""The stage's SFTTrainer: TRL's, without the host syncs it pays on every micro-batch for its logged metrics.

TRL 1.16's `SFTTrainer.compute_loss` turns three metrics into Python floats on every micro-batch (entropy and token
accuracy with `.item()`, its token count with `.item()`), and transformers' Trainer adds two more per micro-batch
(the non-padding token count, `include_num_input_tokens_seen`, from the attention mask or, for packed rows, the
tokens that are not padding; the NaN/inf filter of the logged loss,
`logging_nan_inf_filter`). Each makes the CPU wait until the GPU has run everything queued, so the CPU cannot queue
the next kernels while the GPU works. Here the same values are kept on the device and turned into numbers only when
a row is logged or a checkpoint saved: the loss, the gradients and every logged value are the same as TRL's (tests
compare the logs). A logged row still reads its values back; transformers does it at once, after the step's work,
so the GPU idles while the CPU writes the row and collates the next batch. Here the values are copied off the device
without waiting and the row is logged at the next step's end, once that step's work is queued, as of its own step
(a row at a step that saves, evaluates or ends training is logged at once). Used only on the path tunelens trains on
(one process, TRL's default loss); anything else falls back to TRL's own code.
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
            rows = torch.stack(self._pending_metrics).tolist() if self._pending_metrics else []
            tokens = self._pending_input_tokens.item() if self._pending_input_tokens is not None else None
            self._pending_metrics, self._pending_input_tokens = [], None
            self._apply_metrics(rows, tokens)

        def _apply_metrics(self, rows: list, input_tokens) -> None:
            """Add read-back values: [entropy, accuracy, tokens] per micro-batch, and the input tokens."""
            if rows:
                metrics = self._metrics["train"]
                for entropy, accuracy, tokens in rows:
                    metrics["entropy"].append(entropy)
                    metrics["mean_token_accuracy"].append(accuracy)
                    self._total_train_tokens += int(tokens) // self._tp_size
                metrics["num_tokens"] = [self._total_train_tokens]
            if input_tokens is not None:
                self.state.num_input_tokens_seen += int(input_tokens)

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
                self._host_token_count = True  # the state's count then moves on every micro-batch: no deferred rows
                return super()._track_num_input_tokens(inputs)
            self._pending_input_tokens = count if self._pending_input_tokens is None else self._pending_input_tokens + count

        # ---- log rows one step late (a row's values are read back while the next step runs on the GPU)
        _deferred_row: dict | None = None
        _emitting = False
        _host_token_count = False

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                     learning_rate=None):
            """transformers logs a row by reading its loss, gradient norm and metrics back at once: the GPU then
            idles while the CPU writes the row and prepares the next batch. Here a row's values are copied off the
            device without waiting, and the row is logged at the next step's end, after that step's work is queued,
            with the same values, step, epoch, learning rate and token count. A row at a step that saves,
            evaluates or ends training is logged at once, as before (checkpoints hold every row up to theirs)."""
            self._emit_deferred_row()
            control = self.control
            if (control.should_log and self.state.global_step > self._globalstep_last_logged
                    and not (control.should_save or control.should_evaluate or control.should_training_stop)
                    and self._sync_free(False) and not self._host_token_count):
                self._defer_row(tr_loss, grad_norm, learning_rate, start_time)
            elif control.should_log or control.should_save or control.should_evaluate:
                self._flush_metrics()
            return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                                    start_time, learning_rate=learning_rate)

        def _defer_row(self, tr_loss, grad_norm, learning_rate, start_time) -> None:
            """What transformers' `_maybe_log_save_evaluate` logs, left on the device and copied off it without
            a sync; the state moves on as if the row were logged."""
            grad_on_device = isinstance(grad_norm, torch.Tensor)
            parts = [tr_loss.detach().reshape(1)]
            if grad_on_device:
                parts.append(grad_norm.detach().reshape(1))
            rows = len(self._pending_metrics or [])
            if rows:
                parts.append(torch.stack(self._pending_metrics).reshape(-1))
            has_tokens = self._pending_input_tokens is not None
            if has_tokens:
                parts.append(self._pending_input_tokens.reshape(1))
            values = torch.cat([part.double() for part in parts])  # a new tensor: tr_loss is zeroed below
            self._pending_metrics, self._pending_input_tokens = [], None
            tr_loss -= tr_loss
            event = None
            if values.is_cuda:
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                host.copy_(values, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                values = host
            self._deferred_row = {
                "values": values, "event": event, "grad_on_device": grad_on_device,
                "grad_norm": None if grad_on_device else grad_norm, "rows": rows, "has_tokens": has_tokens,
                "steps": self.state.global_step - self._globalstep_last_logged, "step": self.state.global_step,
                "epoch": self.state.epoch, "start_time": start_time,
                "learning_rate": learning_rate if learning_rate is not None else self._get_learning_rate(),
            }
            self._globalstep_last_logged = self.state.global_step
            self.store_flos()
            self.control.should_log = False

        def _emit_deferred_row(self) -> None:
            """Log the deferred row, as of its own step (its copy finished while the next step ran)."""
            row, self._deferred_row = self._deferred_row, None
            if row is None:
                return
            if row["event"] is not None:
                row["event"].synchronize()
            values = row["values"].tolist()
            loss_sum = values.pop(0)
            grad_norm = values.pop(0) if row["grad_on_device"] else row["grad_norm"]
            metric_rows = [values[3 * i:3 * i + 3] for i in range(row["rows"])]
            self._apply_metrics(metric_rows, values[3 * row["rows"]] if row["has_tokens"] else None)
            logs = {"loss": loss_sum / row["steps"]}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            logs["learning_rate"] = row["learning_rate"]
            self._total_loss_scalar += loss_sum
            now = (self.state.global_step, self.state.epoch)
            should_log = self.control.should_log  # this step's own row (on_log clears the flag)
            self.state.global_step, self.state.epoch = row["step"], row["epoch"]
            self._emitting = True
            try:
                self.log(logs, row["start_time"])
            finally:
                self._emitting = False
                self.state.global_step, self.state.epoch = now
                self.control.should_log = should_log

        def log(self, logs, start_time=None):
            if not self._emitting:
                self._emit_deferred_row()  # rows stay in step order
                self._flush_metrics()
            return super().log(logs, start_time)

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            finally:
                self._emit_deferred_row()
                self._flush_metrics()

    _CLASS = SyncFreeSFTTrainer
    return _CLASS

"""The fine-tuning stage: LoRA / QLoRA SFT of one model on the split's train.jsonl.

Reads: the model directory (results/models/<model>), results/data/<dataset>/train.jsonl, the model's `finetune`
settings (tunelens.settings.finetune.FinetuneSection). Writes: results/finetune/<model>/adapter/ (a PEFT adapter,
adapter_config.json in a stable order), train_log.jsonl, metrics.json, loss.png; checkpoints in a directory the
rule does not own, so a killed job resumes. Public: finetune.finetune() (the job), finetune.build_trainer(),
finetune.lora_config(), finetune.sft_config().

- finetune.py     the job: loads the base, builds the trainer, trains, saves the adapter and the records;
- checkpoints.py  the run fingerprint and which checkpoint a rerun resumes;

- plan.py   the settings' cross-checks, the resolved TrainingPlan (method, dtype, checkpointing, Liger) and target modules;
- data.py   training rows, prompt-completion examples, tokenization with completion masks;
- speed.py  how the GPU is used: packed rows kept apart (block-diagonal mask), the CUDA autotuner, the lean LoRA
            forward and the dequantized 4-bit base;
- trainer.py  TRL's SFTTrainer without its per-micro-batch host syncs (metrics kept on the device until logged);
- outputs.py  the loss log and plot, the divergence check, memory and source records, the adapter config's order;
- distributed.py  data-parallel fine-tuning over a job's GPUs (torchrun).
"""

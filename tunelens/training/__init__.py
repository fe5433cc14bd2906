"""The fine-tuning stage's parts; the job itself is tunelens.training.finetune.finetune().

- plan.py   settings keys, the resolved TrainingPlan (method, dtype, checkpointing, Liger) and target modules;
- data.py   training rows, prompt-completion examples, tokenization with completion masks;
- speed.py  how the GPU is used: packed rows kept apart (block-diagonal mask), the CUDA autotuner, the lean LoRA
            forward and the dequantized 4-bit base;
- trainer.py  TRL's SFTTrainer without its per-micro-batch host syncs (metrics kept on the device until logged).
"""

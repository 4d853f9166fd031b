"""LoRA training: dataset intake, safety gate, PEFT trainer, kohya export, and the Ray Job that runs them."""

"""Few-step distillation of the UNet (`hyportrait distill`): training data, the consistency trainer and its proof
on a toy model the trainer trains itself.

data.py   training shards (safetensors) and their manifest, written by `prepare` and the toy, read by `train`
random_run.py  a random-weight UNet trained on random examples (the speed benchmark's runs, its DDP check among them)
"""

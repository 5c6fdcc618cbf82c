"""The networks of HunyuanPortrait, loading the official checkpoints unchanged, and the contract of their shapes.

One file per network (unet, appearance, expression_encoder, headpose_encoder, motion_refiner, motion,
pose_guider, vae, face_detector, arcface), the weights folder (weights), LoRA merging (lora), random
initialisation for tests and benchmarks (init_weights), and each model's shapes and limits (contract).
Export, engines and runtime all build on this layer; it imports none of them.
"""

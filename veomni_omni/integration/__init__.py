"""Where veomni_omni meets VeOmni: the factories its registries get (registry), the settings it needs
on any device (settings), its distributed set-up on CPU (cpu_distributed), unknown config keys refused
(config_keys), the trainer hooks (trainer_hooks: positions, SP collation, encoders, LoRA targets) and
its compile gates (compile_checks)."""

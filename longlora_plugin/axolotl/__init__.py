"""The Axolotl adapter: LongLoRA's ingredients wired into Axolotl's config and hooks.

* :mod:`.plugin_hooks` - ``LongLoRAPlugin``, the hooks (thin: each calls one of the
  modules below), listed in a config as ``longlora_plugin.LongLoRAPlugin`` (Axolotl
  0.21 also registers it by its entry point under that name);
* :mod:`.cfg` - reading Axolotl's config: sequence length, attention backend, base model
  config, the run's RoPE;
* :mod:`.checks` - combinations with the rest of the config that are refused (the group
  size against ``sequence_len`` by :mod:`longlora_plugin.s2.group_size`'s rule);
* :mod:`.rope_config` - the RoPE written into ``model_config`` and ``config.json``;
* :mod:`.modules_to_save` - embeddings/norms added to ``lora_modules_to_save``;
* :mod:`.merge` - keeping the RoPE through Axolotl 0.19's ``merge-lora``;
* :mod:`.split_training_step` - ``longlora.context_parallel``: each row's training step
  split over the ranks of a context-parallel group;
* :mod:`.validation` - ``longlora validate``: Axolotl's validation, then
  :mod:`.validate_report` - the resolved settings, parameter counts and memory estimate;
* :mod:`.logs` - the plugin's INFO lines in Axolotl's console, rank 0 only.

Importing this package imports Axolotl; ``import longlora_plugin`` does not.
"""

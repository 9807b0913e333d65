"""The Axolotl adapter: LongLoRA's ingredients wired into Axolotl's config and hooks.

* :mod:`.plugin` - ``LongLoRAPlugin``, the hooks (thin: each calls one of the modules below);
* :mod:`.cfg` - reading Axolotl's config: sequence length, attention backend, base model
  config, the run's RoPE;
* :mod:`.checks` - combinations with the rest of the config that are refused;
* :mod:`.rope_config` - the RoPE written into ``model_config`` and ``config.json``;
* :mod:`.modules_to_save` - embeddings/norms added to ``lora_modules_to_save``;
* :mod:`.merge` - keeping the RoPE through Axolotl 0.19's ``merge-lora``;
* :mod:`.validation` - ``longlora validate``: Axolotl's validation plus the report;
* :mod:`.logs` - the plugin's INFO lines in Axolotl's console, rank 0 only.

Importing this package imports Axolotl; ``import longlora_plugin`` does not.
"""

"""Long-context evaluation: perplexity by context length, passkey retrieval, RULER tasks.

Modules, one job each (none imports Axolotl):

* :mod:`.texts` - read evaluation documents (text files, a directory, JSONL, a local
  Hugging Face dataset);
* :mod:`.models` - load a model for evaluation (model dir, interpolation-only RoPE
  override, adapter output dir, merged dir), always with full attention, in one of the
  dtypes :mod:`.dtypes` names;
* :mod:`.loss` - per-token negative log-likelihood from hidden states, ``lm_head``
  applied in chunks (no full-vocabulary logits for a whole long window);
* :mod:`.perplexity` - the two perplexity conventions (``window-mean``,
  ``sliding-window``);
* :mod:`.passkey` - passkey prompts in the paper's format and greedy retrieval;
* :mod:`.ruler` - RULER's synthetic tasks at exact token lengths, from the tasks as data
  (:mod:`.ruler_tasks`) and the prompts' text pieces (:mod:`.ruler_prompts`);
  :mod:`.ruler_eval` - answering, scoring, effective length and the run over models,
  tasks and lengths;
* :mod:`.progress` - the evaluation during training (a ``TrainerCallback``);
* :mod:`.report` - JSON, markdown tables and PNG plots;
* :mod:`.runner` - the evaluations over several models and lengths, as used by the
  ``longlora eval`` CLI and the plugin's end-of-training step.
"""

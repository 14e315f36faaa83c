"""Default sampling settings: what the user asked for, else the model's `generation_config.json`, else the
caller's defaults. `gptlab chat`, `gptlab sample` and `gptlab serve` all resolve them with `resolve_sampling`.

Design decisions
- The settings resolved this way are the four that shape the sampling distribution: temperature, top_k,
  top_p, repetition_penalty. Lengths, stops and seeds are per call and always come from the caller.
- `generation_config.json` is Hugging Face's file (transformers' `GenerationConfig`), which model authors use
  to publish the settings their model was tuned for; `gptlab import` copies it from an HF folder. As in vLLM,
  its values are defaults for requests that leave a setting out. HF's `do_sample: false` means greedy
  decoding whatever the other fields say, so it resolves to temperature 0. Sampling fields we cannot honour
  (`min_p`, `typical_p`, ...) are named in a warning rather than dropped silently; other fields (token ids,
  lengths) are not sampling settings and are ignored here.
- Two sets of defaults for models without the file. `CHAT_DEFAULTS` (temperature 0.8, top-p 0.95, the
  values the web chat page used to send) for answering chat messages (`gptlab chat`, the server's chat
  requests and its web page): at temperature 1 a small model's long tail of unlikely tokens turns
  answers into noise, and top-p cuts that tail. `BASE_DEFAULTS` (the
  untouched distribution, temperature 1, as the OpenAI API documents) for plain completions
  (`gptlab sample`, `/v1/completions`), where a base model's own distribution is what one samples to see.
- The tuning stages (sft, rl, dpo) write `generation_config.json` with `do_sample: false` into the model
  they output (`greedy_generation_config`): the gold accuracies those stages and the speedrun's report
  give are measured greedily, so `gptlab chat` and `gptlab serve` answer, by default, the way the figures
  were obtained. A 5M-parameter model sampled at temperature 0.8 answers "What is the capital of France?"
  with noise its greedy answer does not have. A user still samples with `--temperature`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..common import GptlabError, get_logger, json_bytes, read_json
from .sampling import SamplingParams

log = get_logger("sample")

GENERATION_CONFIG_FILE = "generation_config.json"
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")
CHAT_DEFAULTS = {"temperature": 0.8, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.0}
BASE_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
# transformers GenerationConfig fields that change sampling in ways SamplingParams cannot express
UNSUPPORTED_KEYS = ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "no_repeat_ngram_size",
                    "encoder_repetition_penalty", "top_h")


def greedy_generation_config() -> dict[str, bytes]:
    """The `extra_files` entry of a tuned model's directory that makes greedy decoding its default."""
    return {GENERATION_CONFIG_FILE: json_bytes({"do_sample": False})}


def read_generation_config(model_dir: str | Path) -> dict[str, Any]:
    """The sampling settings in `model_dir/generation_config.json` (only those it sets; {} without the
    file). A value of the wrong type or range is a GptlabError naming the file and field."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    raw = read_json(path, "generation config")
    if not isinstance(raw, dict):
        raise GptlabError(f"{path}: expected a JSON object")
    settings = {}
    for key in SAMPLING_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        number = int if key == "top_k" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            raise GptlabError(f"{path}: {key} must be a{'n integer' if key == 'top_k' else ' number'}, got {value!r}")
        settings[key] = value
    if raw.get("do_sample") is False:  # transformers decodes greedily then, ignoring the sampling fields
        settings = {**settings, "temperature": 0}
    try:
        SamplingParams(**settings)
    except GptlabError as e:
        raise GptlabError(f"{path}: {e}") from None
    ignored = [key for key in UNSUPPORTED_KEYS if raw.get(key) is not None]
    if ignored:
        log.warning("%s: %s not supported, sampling without %s", path, ", ".join(ignored),
                    "it" if len(ignored) == 1 else "them")
    return settings


@dataclass(frozen=True)
class ResolvedSampling:
    values: dict[str, Any]  # every key of SAMPLING_KEYS -> its value
    sources: dict[str, str]  # key -> where the value came from

    def describe(self) -> str:
        """One line for a log: `temperature 0.8 (default), top_k 0 (default), ...`."""
        return ", ".join(f"{key} {self.values[key]:g} ({self.sources[key]})" for key in SAMPLING_KEYS)


def resolve_sampling(explicit: Mapping[str, Any], model_config: Mapping[str, Any],
                     defaults: Mapping[str, Any], explicit_source: str = "command line") -> ResolvedSampling:
    """Each sampling setting from the first of: `explicit` (None = not given), the model's
    generation_config.json settings (`read_generation_config`), `defaults`."""
    values, sources = {}, {}
    for key in SAMPLING_KEYS:
        for source, settings in ((explicit_source, explicit), (GENERATION_CONFIG_FILE, model_config),
                                 ("default", defaults)):
            if settings.get(key) is not None:
                values[key], sources[key] = settings[key], source
                break
        else:
            raise KeyError(f"defaults lack {key}")
    return ResolvedSampling(values, sources)

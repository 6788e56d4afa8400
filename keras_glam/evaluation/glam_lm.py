"""`GLaMLM`: a `GLaMCausalLM` as an lm-evaluation-harness model, registered as `keras_glam`."""

import json
import logging

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from keras_glam.evaluation.batched_generator import BatchedGenerator
from keras_glam.evaluation.model_loading import load_causal_lm
from keras_glam.evaluation.token_scorer import TokenScorer

logger = logging.getLogger(__name__)

# lm-eval's default for `max_gen_toks` (its Hugging Face model uses the same).
DEFAULT_MAX_GEN_TOKS = 256
# Generation settings that change nothing here (greedy decoding needs no temperature).
_IGNORED_GENERATION_SETTINGS = ("temperature", "top_p", "top_k", "do_sample")


@register_model("keras_glam")
class GLaMLM(TemplateLM):
    """A GLaM causal LM for lm-evaluation-harness (`lm_eval`), registered as `keras_glam`.

    Start-token convention (the one of training and `GLaMCausalLM.generate`): every text the
    model reads starts with `<s>`, the tokenizer's start token. `loglikelihood` scores a
    continuation after `<s> + context` (lm-eval's split: the pair is tokenized whole and the
    context's tokens are cut off, spaces at the end of the context moved to the continuation);
    an empty context is `<s>` alone. `loglikelihood_rolling` scores a whole document in
    windows of `max_length` tokens (lm-eval's rolling scheme), the first conditioned on `<s>`.
    `generate_until` continues `<s> + context`.

    Log-likelihoods are batched and compiled by `TokenScorer` (requests packed into rows of a
    few static widths, results in input order, `is_greedy` exact), generation by
    `BatchedGenerator` (KV-cached; greedy by default and stopped at the first stop string, end
    token or `max_gen_toks`; `num_beams` in the generation settings selects beam search, as
    GLaM's own beam width 4). Too-long inputs lose their oldest tokens, with one warning.

    Args:
        model: a `GLaMCausalLM`, or a preset handle (builtin name, directory, `hf://org/name`).
            It must have a tokenizer.
        batch_size: distinct contexts per scoring pass (the choices of a question share their
            context's pass, and their continuations run in passes of up to `batch_size` rounded
            up to a power of two rows) and prompts per batch (generation); None sizes the
            scoring passes automatically (about 2048 tokens) and generates 16 prompts at once.
        max_length: the most tokens the model reads at once; None: the preprocessor's
            `sequence_length` (the training length of a preset saved by `glam-train`).

    Example:
    ```python
    import lm_eval
    from keras_glam.evaluation import GLaMLM

    lm = GLaMLM("glam_small_16e", batch_size=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], num_fewshot=0)
    ```
    """

    def __init__(self, model, batch_size=None, max_length=None):
        super().__init__()
        self.causal_lm = load_causal_lm(model)
        self.glam_tokenizer = self.causal_lm.preprocessor.tokenizer
        max_length = max_length or self.causal_lm.preprocessor.sequence_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}.")
        self.max_length = max_length
        self.batch_size = batch_size
        self.scorer = TokenScorer(self.causal_lm, max_length, batch_size)
        self.generator = BatchedGenerator(self.causal_lm, max_length, batch_size)
        self._prefetched = {}  # Token ids of the strings of the requests being scored.

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """Build from lm-eval's `--model_args model=HANDLE,max_length=N` and its settings."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """Build from a dict of arguments; lm-eval's `device` and `max_batch_size` do not apply."""
        arguments = dict(arg_dict)
        batch_size = (additional_config or {}).get("batch_size")
        if batch_size not in (None, "auto") and "batch_size" not in arguments:
            arguments["batch_size"] = int(batch_size)
        return cls(**arguments)

    @property
    def eot_token_id(self):
        return self.glam_tokenizer.end_token_id

    @property
    def prefix_token_id(self):
        return self.glam_tokenizer.start_token_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """Token ids of `string`, after `<s>` unless `add_special_tokens=False`."""
        token_ids = self._prefetched.get(string)
        if token_ids is None:
            token_ids = [int(token) for token in self.glam_tokenizer.tokenize(string)]
        if add_special_tokens is False:
            return list(token_ids)
        return [self.prefix_token_id, *token_ids]

    def tok_decode(self, tokens, **kwargs):
        return self.glam_tokenizer.detokenize(list(tokens))

    def loglikelihood(self, requests, disable_tqdm=False):
        # lm-eval tokenizes each context once per choice, one string at a time; tokenizing the
        # distinct strings in one call first is several times faster.
        strings = set()
        for context, continuation in (request.args for request in requests):
            stripped = context.rstrip()  # lm-eval's split: trailing whitespace moves on.
            strings.update((stripped, context + continuation) if context else (continuation,))
        strings = sorted(string for string in strings if string)
        self._prefetched = (
            {
                string: [int(token) for token in token_ids]
                for string, token_ids in zip(strings, self.glam_tokenizer.tokenize(strings))
            }
            if strings
            else {}
        )
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._prefetched = {}

    def continuation_length(self, context, continuation):
        """Tokens of `continuation` as `loglikelihood` scores it after `context`.

        GLaM ranks the options of a multiple-choice question by log-likelihood divided by this.
        """
        if context == "":
            return len(self.tok_encode(continuation, add_special_tokens=False))
        return len(self._encode_pair(context, continuation)[1])

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        pairs = [(context, continuation) for _, context, continuation in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="Scoring") as bar:
            return self.scorer.score(pairs, progress=bar.update)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        documents = [
            self.tok_encode(request.args[0], add_special_tokens=False) for request in requests
        ]
        with tqdm(total=len(documents), disable=disable_tqdm, desc="Scoring documents") as bar:
            totals = self.scorer.score_documents(documents, self.prefix_token_id)
            bar.update(len(documents))
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        results = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            context, settings = request.args
            key = json.dumps(settings, sort_keys=True, default=str)
            groups.setdefault(key, (settings, []))[1].append((index, context))
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Generating") as bar:
            for settings, members in groups.values():
                until, max_gen_toks, num_beams = self._generation_settings(settings)
                prompts = [self.tok_encode(context) for _, context in members]
                texts = self.generator.generate(
                    prompts, max_gen_toks, stop=until, num_beams=num_beams, progress=bar.update
                )
                for (index, context), text in zip(members, texts):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", (context, settings), text)
        return results

    def _generation_settings(self, settings):
        settings = dict(normalize_gen_kwargs(dict(settings), DEFAULT_MAX_GEN_TOKS))
        if settings.get("do_sample"):
            raise ValueError(
                "do_sample=True: keras_glam's evaluation decodes greedily or with beam search "
                "(GLaM's protocol). Drop do_sample/temperature, or set num_beams."
            )
        until = settings.pop("until") or []
        max_gen_toks = settings.pop("max_gen_toks")
        num_beams = int(settings.pop("num_beams", 1))
        unknown = sorted(set(settings) - set(_IGNORED_GENERATION_SETTINGS))
        if unknown:
            raise ValueError(
                f"Unsupported generation settings {unknown}: keras_glam's evaluation takes "
                "until, max_gen_toks (or max_new_tokens), num_beams and do_sample=False."
            )
        return until, max_gen_toks, num_beams

"""Turns sampled tokens into per-request output deltas: detokenizing, stop strings, logprobs, n > 1 groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.engine.model_runner import SampledTokens
from kiln.engine.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, TokenLogprobs
from kiln.engine.prompt_logprobs import PromptLogprobsBuilder, PromptScores
from kiln.engine.request import Request
from kiln.engine.stop import StopChecker
from kiln.models.detokenizer import IncrementalDetokenizer
from kiln.models.tokenizer import Tokenizer


@dataclass(slots=True)
class _Sequence:
    request: Request
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker | None
    sent_chars: int = 0  # characters of detokenizer.text already handed out
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[_Sequence] = field(default_factory=list)
    # The prompt's logprobs as steps score them, until the group's first output carries them.
    prompt_logprobs: PromptLogprobsBuilder | None = None

    @property
    def finished(self) -> bool:
        sequences = self.sequences
        if len(sequences) == 1:  # n = 1, nearly every request: no generator per step
            return sequences[0].finish_reason is not None
        return all(seq.finish_reason is not None for seq in sequences)


class OutputProcessor:
    """Owns the text side of every live request. Rules: text handed out is never retracted (a possible
    stop-string prefix is held back until it resolves); stop strings are cut from the text, and the token
    that stopped a request (EOS, a stop token id) is left out of it, both kept with
    `include_stop_str_in_output`; a request finishes on a stop string even if the same token also reached
    max_tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._groups: dict[str, _Group] = {}
        self._group_of: dict[str, _Group] = {}  # sequence request id -> its group

    def add(self, request_id: str, prompt: str | None, requests: list[Request]) -> None:
        group = _Group(request_id=request_id, prompt=prompt, prompt_token_ids=requests[0].prompt_token_ids)
        top = requests[0].params.prompt_logprobs
        if top is not None:
            group.prompt_logprobs = PromptLogprobsBuilder(group.prompt_token_ids, top)
        for request in requests:
            params = request.params
            checker = StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None
            detok = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, skip_special_tokens=params.skip_special_tokens
            )
            group.sequences.append(_Sequence(request=request, detokenizer=detok, stop_checker=checker))
            self._group_of[request.request_id] = group
        self._groups[request_id] = group

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def request_ids(self) -> list[str]:
        return list(self._groups)

    def remove(self, request_id: str) -> list[str]:
        """Forget a caller request; returns its sequences' request ids (for the scheduler to abort)."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return []
        ids = [seq.request.request_id for seq in group.sequences]
        for seq_id in ids:
            self._group_of.pop(seq_id, None)
        return ids

    def process(
        self, advanced: list[Request], sampled: SampledTokens
    ) -> tuple[list[RequestOutput], list[str], dict[str, Exception]]:
        """Returns the step's outputs (one per caller request that advanced), the ids of sequences a stop
        string has just finished (the scheduler must free them), and the caller requests whose outputs
        failed to process (id -> error; the engine aborts them, the others' outputs stand)."""
        deltas: dict[str, list[CompletionOutput]] = {}
        stopped: list[str] = []
        failed: dict[str, Exception] = {}
        if sampled.prompt is not None:
            self._take_prompt_scores(sampled.prompt, failed)
        for request in advanced:
            group = self._group_of.get(request.request_id)
            if group is None or group.request_id in failed:
                continue
            seq = group.sequences[request.index]
            try:
                delta, hit_stop = self._advance(seq, sampled)
            except Exception as exc:  # this request's text (detokenizer, stop strings), not the step's
                failed[group.request_id] = exc
                deltas.pop(group.request_id, None)
                continue
            if hit_stop:
                stopped.append(request.request_id)
            deltas.setdefault(group.request_id, []).append(delta)
        outputs = []
        for request_id, completions in deltas.items():
            if request_id in failed:
                continue
            group = self._groups[request_id]
            finished = group.finished
            first = group.sequences[0].request
            prompt_logprobs: PromptLogprobs | None = None
            if group.prompt_logprobs is not None:  # the group's first output: it carries them
                try:
                    prompt_logprobs = group.prompt_logprobs.result()
                except RuntimeError as exc:
                    failed[request_id] = exc
                    continue
                group.prompt_logprobs = None
            # Positional here and in `_advance`: one of each per request every step, and passing fields by
            # keyword costs twice as much (fields in the records' order, kiln.engine.outputs).
            outputs.append(
                RequestOutput(
                    request_id,
                    group.prompt,
                    group.prompt_token_ids,
                    completions,
                    finished,
                    first.metrics,
                    first.num_cached_tokens or 0,
                    prompt_logprobs,
                )
            )
            if finished:
                self.remove(request_id)
        return outputs, stopped, failed

    def _take_prompt_scores(self, scores: PromptScores, failed: dict[str, Exception]) -> None:
        """File a step's scored prompt rows under their groups (a group gone since is skipped)."""
        decoded: dict[int, str] = {}  # a token's text, decoded once per step

        def decode(token_id: int) -> str:
            text = decoded.get(token_id)
            if text is None:
                text = decoded[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return text

        row = 0
        for request_id, first, count in scores.spans:
            group = self._group_of.get(request_id)
            if group is not None and group.prompt_logprobs is not None:
                try:
                    group.prompt_logprobs.add(scores, row, first, count, decode)
                except Exception as exc:  # this request's detokenizing, not the step's
                    failed[group.request_id] = exc
            row += count

    def _advance(self, seq: _Sequence, sampled: SampledTokens) -> tuple[CompletionOutput, bool]:
        request = seq.request
        token = request.output_token_ids[-1]
        finish_reason = request.status.finish_reason
        if finish_reason != "stop" or _text_keeps(request, token):
            seq.detokenizer.add([token])
        text = seq.detokenizer.text
        new_chars = len(text) - seq.sent_chars
        stop_reason = request.stop_reason
        release_to = len(text) if finish_reason else None
        hit_stop = False
        if seq.stop_checker is not None:
            result = seq.stop_checker.check(text, new_chars)
            if result.stop is not None:
                hit_stop = not request.status.finished
                finish_reason, stop_reason, release_to = "stop", result.stop, result.cut
            elif release_to is None:
                release_to = result.safe_len
        if release_to is None:
            release_to = len(text)
        delta_text = text[seq.sent_chars : max(release_to, seq.sent_chars)]
        seq.sent_chars = max(release_to, seq.sent_chars)
        seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
        logprobs = None if request.params.logprobs is None else self._logprobs(request, sampled, seq)
        return (
            CompletionOutput(
                request.index,
                delta_text,
                [token],
                logprobs,
                seq.cumulative_logprob if logprobs is not None else None,
                finish_reason,  # type: ignore[arg-type]
                stop_reason,
            ),
            hit_stop,
        )

    def _logprobs(
        self, request: Request, sampled: SampledTokens, seq: _Sequence
    ) -> list[TokenLogprobs] | None:
        num = request.params.logprobs
        out = sampled.output
        if num is None or out is None or out.logprobs is None:
            return None
        row = sampled.row_of[request.request_id]
        token = request.output_token_ids[-1]
        logprob = float(out.logprobs[row])
        seq.cumulative_logprob += logprob
        entry: TokenLogprobs = {}
        if num and out.topk_token_ids is not None and out.topk_logprobs is not None:
            ids = out.topk_token_ids[row, :num].tolist()
            lps = out.topk_logprobs[row, :num].tolist()
            for rank, (tid, lp) in enumerate(zip(ids, lps, strict=True), start=1):
                entry[tid] = Logprob(
                    logprob=lp, rank=rank, decoded=self.tokenizer.decode([tid], skip_special_tokens=False)
                )
        rank = int(out.ranks[row]) if out.ranks is not None else 1
        entry[token] = Logprob(
            logprob=logprob, rank=rank, decoded=self.tokenizer.decode([token], skip_special_tokens=False)
        )
        return [entry]


def _text_keeps(request: Request, token: int) -> bool:
    """Whether the text of a request that just stopped has its last token in it: not when that token is
    what stopped it (EOS or a stop token id), unless `include_stop_str_in_output` (as vLLM; a stop string
    is cut the same way). A structured output's last token, which completed its grammar, stays."""
    params = request.params
    if params.include_stop_str_in_output:
        return True
    if request.stop_reason == token:
        return False
    return params.ignore_eos or token not in request.eos_token_ids

"""train/recall_mix.py: recall episodes are deterministic, resume exactly, hold what they promise
and share no wording with the evaluation's prompts."""

import numpy as np
import pytest

from memlong_jax.eval.recall import prompts
from train import data as datamod
from train import recall_mix
from train.recall_mix import RecallMix

SEQ, EPISODE = 256, 3


def streams(seed=7, fraction=0.5, kinds=recall_mix.KINDS, n_streams=2):
    rng = np.random.default_rng(0)   # random bytes of printable text
    tokens = rng.integers(97, 123, size=SEQ * 60).astype(np.uint16)
    blocks = datamod.Blocks(tokens, SEQ, 0.0)
    mix = RecallMix(datamod.ByteTokenizer(), SEQ, fraction, EPISODE, seed, kinds)
    return datamod.Streams(blocks, n_streams, 2, mix)


def text(ids) -> str:
    return datamod.ByteTokenizer().decode_batch([ids])[0]


def test_same_seed_same_batches_in_any_order_other_seed_differs():
    a, b, other = streams(), streams(), streams(seed=8)
    forward = [a.batch(step) for step in range(12)]
    backward = [b.batch(step) for step in reversed(range(12))][::-1]   # a resume, any order
    for x, y in zip(forward, backward):
        np.testing.assert_array_equal(x, y)
    assert any((x != other.batch(i)).any() for i, x in enumerate(forward))
    plain = datamod.Streams(a.blocks, 2, 2)
    changed = [(a.batch(i) != plain.batch(i)).any(axis=-1) for i in range(12)]
    assert 0 < np.mean(changed) < 1      # some blocks carry recall items, others are plain


def test_context_is_the_tail_of_the_previous_block_in_any_order():
    """`prefix_overlap`'s context of each micro-step is the last `width` tokens of the block its
    stream read (recall items in) one micro-step before, across steps and the epoch boundary
    (step 15), also when a fresh instance starts at a later step (a resume); only the very
    first micro-step has none."""
    width, steps = 12, 20
    a, b = streams(), streams()
    ids = np.concatenate([a.batch(step) for step in range(steps)])    # [micro, row, SEQ]
    backward = [b.context(step, width) for step in reversed(range(steps))][::-1]
    context = np.concatenate([c for c, _ in backward])
    has = np.concatenate([h for _, h in backward])
    np.testing.assert_array_equal(has, np.arange(len(ids)) > 0)
    np.testing.assert_array_equal(context[1:], ids[:-1, :, -width:])
    assert not context[0].any()
    assert a.micro_per_epoch < len(ids)          # the epoch boundary is crossed
    one_row, _ = streams().context(7, width, rows=[1])
    np.testing.assert_array_equal(one_row[:, 1], context[14:16, 1])
    assert not one_row[:, 0].any()


def test_fraction_of_recall_episodes():
    mix = streams(fraction=0.3).mix
    kinds = [mix.kind(row, episode) for row in range(4) for episode in range(500)]
    assert abs(np.mean([k is not None for k in kinds]) - 0.3) < 0.04
    assert {k for k in kinds if k} == set(recall_mix.KINDS)
    assert all(streams(fraction=0.0).mix.kind(0, e) is None for e in range(100))


def episode_blocks(s, row, episode):
    return [s.tokens(episode * EPISODE + i, row) for i in range(EPISODE)]


def test_repeat_episode_copies_an_earlier_passage_into_the_last_block():
    s = streams(fraction=1.0, kinds=("repeat",))
    for episode in range(5):
        got = np.concatenate(episode_blocks(s, 0, episode))
        real = np.concatenate([s.blocks.block(s.block_index(episode * EPISODE + i, 0))
                               for i in range(EPISODE)])
        changed = np.flatnonzero(got != real)
        assert changed.min() >= (EPISODE - 1) * SEQ          # only the last block changes
        start, stop = changed.min(), changed.max() + 1
        passage = got[start:stop]
        earlier = got[:(EPISODE - 1) * SEQ]
        windows = np.lib.stride_tricks.sliding_window_view(earlier, len(passage))
        assert (windows == passage).all(axis=1).any()        # it was said before
        assert stop - start >= SEQ // 16


@pytest.mark.parametrize("kind", ["facts", "passkey"])
def test_statements_early_questions_with_answers_last(kind):
    s = streams(fraction=1.0, kinds=(kind,))
    for episode in range(4):
        blocks = episode_blocks(s, 1, episode)
        early, last = text(np.concatenate(blocks[:-1])), text(blocks[-1])
        numbers = [w.strip(".") for w in last.split() if w.strip(".").isdigit()]
        assert numbers
        for number in numbers:
            assert number in early
        if kind == "passkey":
            assert last.rstrip().endswith(numbers[-1] + ".")


def test_no_wording_of_the_evaluation():
    """No three consecutive words of an evaluation prompt occur in a training template."""
    templates = [line for pair in recall_mix.CODE_LINES + recall_mix.FACT_LINES for line in pair]
    evaluation = [prompts.INTRO, prompts.FILLER, prompts.KEY_LINE, prompts.QUESTION,
                  *[line for pair in prompts.NEEDLES for line in pair]]

    def trigrams(line):
        words = [w.strip(".?:,'").lower() for w in line.split()]
        return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}

    held_out = set().union(*map(trigrams, evaluation))
    for template in templates:
        assert not trigrams(template) & held_out, template

"""Decode groups (app/engine/decode_groups.py) under mlx-lm's BatchGenerator, with a tiny
llama model: where a joining sequence goes, and that rows are found, removed and extracted by
their index over all groups."""

from __future__ import annotations

from typing import Any

import pytest
from mlx_lm.generate import BatchGenerator

from app.engine.decode import empty_decode_batch
from app.engine.decode_groups import DecodeGroups, weight_bytes
from tests.unit.test_cpu_tuning import tiny_model

SHORT = [[5, 6, 7, 8, 9], [11, 12, 13, 14], [21, 22, 23, 24, 25, 26]]
LONG = [(i * 7) % 290 + 3 for i in range(300)]


def generator_with_groups(model: Any, forward_bytes: int | None = None
                          ) -> tuple[BatchGenerator, DecodeGroups]:
    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
    fallback = generator._generation_batch.fallback_sampler
    groups = DecodeGroups(lambda: empty_decode_batch(model, fallback),
                          weight_bytes(model) if forward_bytes is None else forward_bytes,
                          kv_byte_cost=1.0)
    generator._generation_batch = groups
    return generator, groups


def run(generator: BatchGenerator, tokens: dict[int, list[int]]) -> None:
    for response in generator.next()[1]:
        tokens.setdefault(response.uid, []).append(response.token)


def decode_until_joined(generator: BatchGenerator, groups: DecodeGroups, rows: int,
                        tokens: dict[int, list[int]]) -> None:
    while len(groups) < rows:
        run(generator, tokens)


def test_a_long_prompt_gets_its_own_group_and_short_ones_join_theirs() -> None:
    model = tiny_model()
    # Padding the short rows to the long one: 2 rows x ~300 positions x 512 bytes (2 layers).
    generator, groups = generator_with_groups(model, forward_bytes=100_000)
    tokens: dict[int, list[int]] = {}
    short = generator.insert(SHORT[:2], max_tokens=[40, 40])
    decode_until_joined(generator, groups, 2, tokens)
    (long,) = generator.insert([LONG], max_tokens=[40])
    decode_until_joined(generator, groups, 3, tokens)
    assert [g.uids for g in groups.groups] == [short, [long]]
    (third,) = generator.insert([SHORT[2]], max_tokens=[40])
    decode_until_joined(generator, groups, 4, tokens)
    assert [g.uids for g in groups.groups] == [[*short, third], [long]]
    assert groups.uids == [*short, third, long]

    # Indices run over the groups in order: the long row is the last one.
    assert groups.extract_cache(3)[0].offset > len(LONG)
    assert groups.extract_cache(2)[0].offset < 20
    assert generator.prompt_cache_nbytes > 0
    generator.remove([short[0], long])
    assert [g.uids for g in groups.groups] == [[short[1], third]]  # an empty group is dropped
    for _ in range(3):
        run(generator, tokens)
    assert len(tokens[short[1]]) > len(tokens[short[0]])
    generator.close()


def test_padding_cheaper_than_a_forward_merges() -> None:
    model = tiny_model()
    generator, groups = generator_with_groups(model, forward_bytes=10**12)
    tokens: dict[int, list[int]] = {}
    generator.insert(SHORT[:2], max_tokens=[40, 40])
    decode_until_joined(generator, groups, 2, tokens)
    generator.insert([LONG], max_tokens=[40])
    decode_until_joined(generator, groups, 3, tokens)
    assert [len(g) for g in groups.groups] == [3]
    generator.close()


@pytest.mark.parametrize("separate", [True, False])
def test_every_row_decodes_what_it_decodes_alone(separate: bool) -> None:
    model = tiny_model()
    alone: dict[int, list[int]] = {}
    for i, prompt in enumerate([*SHORT[:2], LONG]):
        generator, groups = generator_with_groups(model)
        got: dict[int, list[int]] = {}
        generator.insert([prompt], max_tokens=[12])
        while len(groups) or not got:
            run(generator, got)
        alone[i] = got[0]
        generator.close()

    generator, groups = generator_with_groups(model, forward_bytes=0 if separate else 10**12)
    tokens: dict[int, list[int]] = {}
    generator.insert(SHORT[:2], max_tokens=[12, 12])
    decode_until_joined(generator, groups, 2, tokens)
    generator.insert([LONG], max_tokens=[12])
    while len(groups) or len(tokens) < 3:
        run(generator, tokens)
    assert tokens == alone
    generator.close()

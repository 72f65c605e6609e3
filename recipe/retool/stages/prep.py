"""The data stage: ReTool-SFT, DAPO-Math-17k and AIME 2024/2025 as verl parquet on the data
volume, filtered by the base model's tokenizer when it is there."""

from __future__ import annotations

from pathlib import Path

from recipe.retool.core.paths import Layout
from recipe.retool.data.prep import prepare
from recipe.retool.launch.commands import load_stage_config


def prepare_dataset(
    layout: Layout,
    *,
    only: str = "",
    source_dir: str = "",
    max_rows: int = 0,
    on_error: str = "fail",
) -> None:
    """:func:`~recipe.retool.data.prep.prepare` into ``layout.data``. With the base model
    downloaded first, its tokenizer gives token-length percentiles and SFT traces longer than
    the SFT ``data.max_length`` are dropped (and counted) instead of failing training mid-epoch.
    A mistake raises ``PrepError`` or ``MalformedRow`` with one line."""
    model_dir = layout.model_dir()
    has_tokenizer = (model_dir / "tokenizer_config.json").exists()
    if not has_tokenizer:
        print(
            "note: no base model yet (run download_model first): no token-length stats, and "
            "SFT traces over data.max_length are kept (the pipeline will prepare again)"
        )
    max_length = load_stage_config("sft").overrides["data.max_length"]
    prepare(
        layout.data,
        only=[only] if only else None,
        source_dir=Path(source_dir) if source_dir else None,
        max_rows=max_rows or None,
        on_error=on_error,
        tokenizer=model_dir if has_tokenizer else None,
        sft_max_length=max_length if has_tokenizer else None,
    )

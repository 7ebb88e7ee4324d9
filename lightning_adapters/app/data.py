"""Data for the training app: short texts with a real-valued human rating, read from a local delimited file.

The default data set is the VADER sentiment lexicon (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based
Model for Sentiment Analysis of Social Media Text"): about 7,500 English words, slang and emoticons, each rated
by ten people on a valence scale from -4 (extremely negative) to +4 (extremely positive). Its lines read
``token <TAB> mean rating <TAB> std <TAB> [ten ratings]``. Any file with a text column and a numeric column works
the same way (``data=tsv data.path=...``).

Two objectives share the data: ``regression`` predicts the rating, ``sign`` predicts whether it is positive.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

OBJECTIVES = ("regression", "sign")


class ByteTokenizer:
    """Tokenizer with no vocabulary file: UTF-8 bytes shifted by one, id 0 is padding (``vocab_size`` 257).

    Used with the randomly initialised models built from a config (tiny Llama, text CNN), which have no
    tokenizer of their own. Calls like a Hugging Face tokenizer for the arguments the data module passes, and as
    the README's inference code calls one (``tokenizer(words, padding=True, return_tensors="pt")``: no
    ``max_length``, nothing cut).
    """

    vocab_size = 257
    pad_token_id = 0

    def __call__(
        self,
        texts: list[str],
        *,
        max_length: int | None = None,
        padding: bool = True,
        truncation: bool = True,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        rows = [[b + 1 for b in t.encode("utf-8")][:max_length] for t in texts]
        width = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (N, T), 0 = pad
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def read_rated_texts(
    path: str | Path, *, text_column: int, label_column: int, delimiter: str, skip_header: bool
) -> tuple[list[str], list[float]]:
    """Texts and float ratings from a delimited file (no quoting: emoticons such as ``"`` are kept as is).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A line has too few columns or a rating that is not a number (the line number is given).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; set data.path to a delimited text file")
    texts: list[str] = []
    labels: list[float] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        for lineno, row in enumerate(reader, start=1):
            if (skip_header and lineno == 1) or not row:
                continue
            if len(row) <= max(text_column, label_column):
                raise ValueError(
                    f"{path}:{lineno}: expected at least {max(text_column, label_column) + 1} columns separated by "
                    f"{delimiter!r}, got {len(row)}; check data.delimiter / data.text_column / data.label_column"
                )
            try:
                labels.append(float(row[label_column]))
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: column {label_column} is {row[label_column]!r}, not a number; "
                    "set data.label_column (or data.skip_header=true for a header line)"
                ) from None
            texts.append(row[text_column])
    if len(texts) < 10:
        raise ValueError(f"data file {str(path)!r} holds {len(texts)} rated texts; at least 10 are needed")
    return texts, labels


class RatedTextDataModule(L.LightningDataModule):
    """Short texts with a rating: tokenised once, split at random (seeded) into train / val / test.

    Args:
        path: Delimited text file (the VADER lexicon by default).
        tokenizer: Called as ``tokenizer(texts, padding=True, truncation=True, max_length=..., return_tensors="pt")``;
            a Hugging Face tokenizer or ``ByteTokenizer``. The training app passes the model's tokenizer.
        objective: ``"regression"`` (target = rating) or ``"sign"`` (target = 1 if rating > 0 else 0).
        text_column: Column of the text.
        label_column: Column of the rating.
        delimiter: Column separator.
        skip_header: The first line is a header.
        val_fraction: Share of rows held out for validation.
        test_fraction: Share of rows held out for the final test.
        split_seed: Seed of the random split (fixed, so every run and every method sees the same split).
        batch_size: Training batch size; evaluation uses twice as many.
        max_length: Tokens kept per text.
        num_workers: DataLoader workers (the data is tiny and pre-tokenised; 0 is fastest).
    """

    def __init__(
        self,
        path: str,
        tokenizer: Any = None,
        objective: str = "regression",
        text_column: int = 0,
        label_column: int = 1,
        delimiter: str = "\t",
        skip_header: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        max_length: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) and sum below 1"
            )
        if tokenizer is None:
            raise ValueError("RatedTextDataModule needs a tokenizer; the training app passes the model's tokenizer")
        self.path = path
        self.tokenizer = tokenizer
        self.objective = objective
        self.columns = (text_column, label_column)
        self.delimiter = delimiter
        self.skip_header = skip_header
        self.fractions = (val_fraction, test_fraction)
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        texts, ratings = read_rated_texts(
            self.path,
            text_column=self.columns[0],
            label_column=self.columns[1],
            delimiter=self.delimiter,
            skip_header=self.skip_header,
        )
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )  # input_ids, attention_mask: (N, T)
        y = torch.tensor(ratings, dtype=torch.float32)
        if self.objective == "sign":
            y = (y > 0).float()
        n = len(texts)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        n_val, n_test = max(1, round(n * self.fractions[0])), round(n * self.fractions[1])
        parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        ids, mask = enc["input_ids"], enc["attention_mask"]
        self.splits = {k: TensorDataset(ids[i], mask[i], y[i]) for k, i in parts.items() if len(i)}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            raise RuntimeError(f"no {split!r} split: set data.test_fraction > 0 to test")
        bs = self.batch_size if shuffle else 2 * self.batch_size
        return DataLoader(self.splits[split], batch_size=bs, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

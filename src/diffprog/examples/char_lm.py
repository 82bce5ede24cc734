"""A small Transformer language model over characters, trained for about a minute.

The text is a few short stories that ship with diffprog (``examples/data/tiny_corpus.txt``,
about 8 KB; pass ``--text FILE`` for another). The model is a user-defined ``Parameterized``
record: a token and a position embedding, pre-norm ``TransformerEncoderLayer`` blocks with a
causal mask, a final LayerNorm and an output projection whose weight *is* the token
embedding's (a weight tie, kept through every training step by ``replace_parameters``).

Adam trains it on random windows of the first 90% of the text, inside ``diffprog.nn.training``
so that dropout (``--dropout``, 0.2) draws from an explicit generator. The losses on the
training text and on the held-out 10% are printed before and after. A text this small is soon
learned by heart, dropout or not, so the held-out loss is checked every 100 steps and the model
that did best there (models are values: keeping one is keeping a reference) writes the sample,
from a seeded generator. It runs on one CPU thread unless told otherwise (``--threads``);
``--steps`` instead of the time budget makes a run reproducible.

Run: ``python -m diffprog.examples.char_lm [--seconds 60] [--steps N] [--length 400]``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import math
import pathlib
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

import diffprog as dp
from diffprog import nn
from diffprog.nn import (
    Embedding,
    LayerNorm,
    LayerNormSpec,
    Linear,
    TransformerEncoderLayer,
    TransformerEncoderLayerSpec,
    generate_square_subsequent_mask,
)
from diffprog.optim import Adam, run_step


def default_text() -> str:
    """The story shipped with the package."""
    files = importlib.resources.files("diffprog.examples")
    return (files / "data" / "tiny_corpus.txt").read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The characters of a text, each with an index."""

    chars: str

    @classmethod
    def of(cls, text: str) -> Vocabulary:
        """The sorted set of characters in ``text``."""
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> torch.Tensor:
        """Indices of the characters of ``text``, as a long tensor."""
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, indices: torch.Tensor) -> str:
        """The text of a 1-D tensor of indices."""
        return "".join(self.chars[i] for i in indices.tolist())


class CharTransformer(dp.Parameterized):
    """A decoder-only Transformer over characters (a tiny GPT), as a value.

    Attributes:
        token: the character embedding, ``[vocab, d_model]``.
        position: the learned position embedding, ``[block_size, d_model]``.
        blocks: pre-norm encoder layers, run with a causal mask.
        norm: the final LayerNorm.
        head: the output projection; its weight is ``token.weight`` (tied).
    """

    token: Embedding
    position: Embedding
    blocks: tuple[TransformerEncoderLayer, ...]
    norm: LayerNorm
    head: Linear

    @property
    def block_size(self) -> int:
        """The longest context the model reads."""
        return int(self.position.weight.shape[0])

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-character logits ``[N, T, vocab]`` for character indices ``[N, T]``."""
        length = tokens.shape[-1]
        x = self.token(tokens) + self.position(torch.arange(length, device=tokens.device))
        mask = generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


@dataclasses.dataclass(frozen=True)
class CharTransformerSpec:
    """The hyper-parameters of :class:`CharTransformer`."""

    vocab_size: int
    block_size: int = 64
    d_model: int = 64
    nhead: int = 4
    num_layers: int = 2
    dim_feedforward: int = 256
    dropout: float = 0.2

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: dp.DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> CharTransformer:
        """Embeddings drawn from N(0, 0.02) (GPT-2's choice), the layers as torch.nn's."""
        kw = {"generator": generator, "device": device, "dtype": dtype}

        def embedding(rows: int) -> Embedding:
            weight = dp.init_parameter(
                (rows, self.d_model),
                lambda t, g: torch.nn.init.normal_(t, 0.0, 0.02, generator=g),
                **kw,  # type: ignore[arg-type]
            )
            return Embedding(weight)

        token = embedding(self.vocab_size)
        position = embedding(self.block_size)
        layer = TransformerEncoderLayerSpec(
            self.d_model,
            self.nhead,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        blocks = tuple(dp.sample(layer, **kw) for _ in range(self.num_layers))  # type: ignore[arg-type]
        norm = dp.sample(LayerNormSpec(self.d_model), **kw)  # type: ignore[arg-type]
        return CharTransformer(token, position, blocks, norm, Linear(token.weight))


def windows(
    data: torch.Tensor, batch_size: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data``: inputs ``[batch, length]`` and the next characters."""
    starts = torch.randint(0, data.numel() - length, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(length + 1)
    chunk = data[offsets]
    return chunk[:, :-1], chunk[:, 1:]


def lm_loss(model: CharTransformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next-character predictions."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def evaluate(model: CharTransformer, data: torch.Tensor) -> float:
    """The mean loss over consecutive windows covering ``data`` (dropout off)."""
    length = min(model.block_size, data.numel() - 1)
    starts = range(0, data.numel() - length, length)
    x = torch.stack([data[s : s + length] for s in starts])
    y = torch.stack([data[s + 1 : s + length + 1] for s in starts])
    with torch.no_grad():
        return lm_loss(model, x, y).item()


def generate(
    model: CharTransformer,
    prompt: torch.Tensor,
    length: int,
    generator: torch.Generator,
    temperature: float = 0.8,
) -> torch.Tensor:
    """Extend the 1-D ``prompt`` by ``length`` characters sampled from the model."""
    out = prompt
    with torch.no_grad():
        for _ in range(length):
            logits = model(out[-model.block_size :][None])[0, -1]
            probs = torch.softmax(logits / temperature, dim=-1)
            out = torch.cat([out, torch.multinomial(probs, 1, generator=generator)])
    return out


@dataclasses.dataclass(frozen=True)
class Trained:
    """The outcome of :func:`train`.

    Attributes:
        model: the model after the last step.
        best: the model with the lowest held-out loss seen (checked every ``eval_every`` steps
            and at the end): models are values, so keeping one is keeping a reference.
        best_step: the step ``best`` was taken after.
        best_loss: its held-out loss.
        steps: the steps taken.
    """

    model: CharTransformer
    best: CharTransformer
    best_step: int
    best_loss: float
    steps: int


def train(
    model: CharTransformer,
    data: torch.Tensor,
    valid: torch.Tensor,
    *,
    seconds: float,
    steps: int | None,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    eval_every: int = 100,
    progress: bool = True,
) -> Trained:
    """Train with Adam for ``seconds`` (or ``steps``, if given), checking ``valid`` as it goes.

    The learning rate warms up linearly over the first 50 steps.
    """
    optimizer = Adam.init(model)
    warmup = 50
    done, start = 0, time.perf_counter()
    best, best_step, best_loss = model, 0, evaluate(model, valid)
    with tqdm(total=steps, disable=not progress, unit="step") as bar:
        while (steps is not None and done < steps) or (
            steps is None and time.perf_counter() - start < seconds
        ):
            x, y = windows(data, batch_size, model.block_size, generator)
            loss, model = nn.training(lm_loss, model, x, y, generator=generator)
            rate = lr * min(1.0, (done + 1) / warmup)
            model, optimizer = run_step(model, optimizer, loss, rate)
            done += 1
            if done % eval_every == 0:
                held_out = evaluate(model, valid)
                if held_out < best_loss:
                    best, best_step, best_loss = model, done, held_out
            bar.set_postfix(
                loss=f"{loss.item():.3f}", best_held_out=f"{best_loss:.3f}", refresh=False
            )
            bar.update()
    held_out = evaluate(model, valid)
    if held_out < best_loss:
        best, best_step, best_loss = model, done, held_out
    return Trained(model, best, best_step, best_loss, done)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, train the model, print the losses and a sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time (60)")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per step (32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (3e-3)")
    parser.add_argument("--layers", type=int, default=2, help="Transformer layers (2)")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout in the layers (0.2)")
    parser.add_argument("--length", type=int, default=400, help="characters to generate (400)")
    parser.add_argument("--prompt", default="The ", help="text to start the sample with")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, batches, sample")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1)")
    parser.add_argument("--text", type=pathlib.Path, default=None, help="train on this file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    text = default_text() if args.text is None else args.text.read_text(encoding="utf-8")
    vocab = Vocabulary.of(text)
    unknown = set(args.prompt) - set(vocab.chars)
    if unknown:
        parser.error(f"the prompt has characters the text lacks: {''.join(sorted(unknown))!r}")
    data = vocab.encode(text)
    split = int(0.9 * data.numel())
    train_data, valid_data = data[:split], data[split:]

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        generator = torch.Generator().manual_seed(args.seed)
        spec = CharTransformerSpec(len(vocab.chars), num_layers=args.layers, dropout=args.dropout)
        model = dp.sample(spec, generator=generator)
        count = sum(p.numel() for p in dp.flatten_parameters(model))
        print(f"text: {len(text)} characters, {len(vocab.chars)} distinct; model: {count} weights")
        before = (evaluate(model, train_data), evaluate(model, valid_data))
        print(f"before training: train loss {before[0]:.3f}, held-out loss {before[1]:.3f}")
        result = train(
            model,
            train_data,
            valid_data,
            seconds=args.seconds,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            generator=generator,
            progress=not args.no_progress,
        )
        model = result.model
        after = (evaluate(model, train_data), evaluate(model, valid_data))
        print(
            f"after {result.steps} steps: train loss {after[0]:.3f}, held-out loss {after[1]:.3f}"
            f" (uniform guessing: {math.log(len(vocab.chars)):.3f})"
        )
        print(
            f"lowest held-out loss: {result.best_loss:.3f}, after step {result.best_step}; "
            "that model writes the sample"
        )
        tied = all(m.head.weight is m.token.weight for m in (result.model, result.best))
        print(f"output projection still tied to the token embedding: {tied}")
        sample_gen = torch.Generator().manual_seed(args.seed)
        out = generate(result.best, vocab.encode(args.prompt), args.length, sample_gen)
        print("sample:")
        print(vocab.decode(out))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()

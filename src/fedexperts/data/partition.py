"""Split a dataset across federated clients: IID, Dirichlet over categories, or pathological.

The splits are made by ``flwr_datasets`` partitioners over a ``datasets.Dataset``; each client's
part is then split into train and test, per category, so that every category a client holds is
also in its test set when it has at least two rows of it. A ``row_id`` column records each row's
place in the input, which makes disjointness and coverage checkable. Everything is a function of
the seed.

FLEx's Dolly splits need three more options: ``categories`` keeps only the listed categories;
``test_per_category`` holds out that many rows of each category as the test set before the split
(each client is tested on the held-out rows of the categories it trains on); ``rows_per_client``
draws each client's training rows with replacement (Dirichlet: rows weighted by the client's
Dirichlet share of their category, as the official ``dirichlet_dataset/split.py`` does).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
from rich.table import Table

from fedexperts.errors import DataError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

    from fedexperts.config import DataConfig

ROW_ID = "row_id"


class Scheme(StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    PATHOLOGICAL = "pathological"


@dataclass(frozen=True)
class PartitionSpec:
    scheme: Scheme = Scheme.DIRICHLET
    num_clients: int = 8
    alpha: float = 0.5
    """Dirichlet concentration: small is skewed (few categories per client), large is near-uniform."""
    classes_per_client: int = 2
    """Pathological: how many categories each client holds."""
    by: str = "category"
    test_fraction: float = 0.2
    min_partition_size: int = 4
    """Dirichlet: redraw (up to 10 times) until every client has at least this many rows."""
    seed: int = 0
    categories: tuple[str, ...] | None = None
    """Keep only rows whose ``by`` value is listed (``None``: every row); a value no row has is an error."""
    rows_per_client: int | None = None
    """Draw this many training rows per client with replacement (``None``: split the rows, no repeats)."""
    test_per_category: int | None = None
    """Hold out this many rows of each category as the test set (``None``: ``test_fraction`` of each client's)."""


def spec_from_config(data: DataConfig, clients: int) -> PartitionSpec:
    """The partition an experiment's ``data`` section asks for (``run`` and ``partition`` share it)."""
    return PartitionSpec(
        Scheme(data.scheme),
        num_clients=clients,
        alpha=data.alpha,
        classes_per_client=data.classes_per_client,
        test_fraction=data.test_fraction,
        seed=data.seed,
        categories=tuple(data.categories) if data.categories is not None else None,
        rows_per_client=data.rows_per_client,
        test_per_category=data.test_per_category,
    )


@dataclass(frozen=True)
class ClientSplit:
    client: int
    train: datasets.Dataset
    test: datasets.Dataset

    @property
    def size(self) -> int:
        return len(self.train) + len(self.test)


@dataclass(frozen=True)
class Partition:
    spec: PartitionSpec
    clients: tuple[ClientSplit, ...]
    categories: tuple[str, ...]
    unassigned: int
    """Rows no client received (pathological splits with fewer clients than categories, or rows never drawn)."""
    held_out: datasets.Dataset | None = None
    """The test rows held out per category before the split (``test_per_category`` or ``rows_per_client``);
    each client's test rows are drawn from it. ``None``: each client's own rows were split."""
    dropped: int = 0
    """Rows left out by ``categories``."""

    def counts(self) -> list[Counter[str]]:
        """Per client: rows of each category, train and test together."""
        return [Counter(client.train[self.spec.by]) + Counter(client.test[self.spec.by]) for client in self.clients]

    def heterogeneity(self) -> float:
        """Mean total-variation distance between each client's category mix and the whole data's.

        0 for identical mixes; close to 1 when clients hold categories the others do not.
        """
        counts = self.counts()
        total = sum(counts, Counter())
        overall = np.array([total[name] for name in self.categories], dtype=float)
        overall /= overall.sum()
        distances = []
        for client in counts:
            mix = np.array([client[name] for name in self.categories], dtype=float)
            distances.append(0.5 * np.abs(mix / max(mix.sum(), 1.0) - overall).sum())
        return float(np.mean(distances))


def _partitioner(spec: PartitionSpec) -> Partitioner:
    # Imported here: flwr_datasets loads matplotlib and seaborn for its plots (about 1.3 s), which a
    # Flower node that reads its partition from the node cache never needs.
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if spec.scheme == Scheme.IID:
        return IidPartitioner(num_partitions=spec.num_clients)
    if spec.scheme == Scheme.DIRICHLET:
        return DirichletPartitioner(
            num_partitions=spec.num_clients,
            partition_by=spec.by,
            alpha=spec.alpha,
            min_partition_size=spec.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=spec.seed,
        )
    return PathologicalPartitioner(
        num_partitions=spec.num_clients,
        partition_by=spec.by,
        num_classes_per_partition=spec.classes_per_client,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=spec.seed,
    )


def partition(dataset: datasets.Dataset, spec: PartitionSpec) -> Partition:
    """Split ``dataset`` into ``spec.num_clients`` clients, each with a train and a test part."""
    if spec.num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {spec.num_clients}")
    if not 0.0 <= spec.test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {spec.test_fraction}")
    if spec.by not in dataset.column_names:
        raise DataError(f"cannot partition by {spec.by!r}: the dataset's columns are {', '.join(dataset.column_names)}")
    if ROW_ID in dataset.column_names:  # a part of an earlier partition: number its rows afresh
        dataset = dataset.remove_columns(ROW_ID)
    indexed = dataset.add_column(ROW_ID, list(range(len(dataset))))
    total = len(indexed)
    if spec.categories is not None:
        indexed = _keep_categories(indexed, spec)
    if len(indexed) < spec.num_clients:
        raise DataError(f"{len(indexed)} rows cannot be split across {spec.num_clients} clients")
    kept = len(indexed)
    categories = tuple(sorted(str(name) for name in indexed.unique(spec.by)))
    rng = np.random.default_rng(spec.seed)
    held_out = None
    if spec.test_per_category is not None or spec.rows_per_client is not None:
        indexed, held_out = _hold_out(indexed, spec, rng)
    parts = _draw(indexed, spec, categories, rng) if spec.rows_per_client is not None else _split(indexed, spec)
    if held_out is None:
        clients = tuple(ClientSplit(client, *_train_test(part, spec, rng, client)) for client, part in enumerate(parts))
    else:
        clients = tuple(
            ClientSplit(client, *_with_held_out(part, held_out, spec, client)) for client, part in enumerate(parts)
        )
    used = {row for client in clients for part in (client.train, client.test) for row in part[ROW_ID]}
    return Partition(spec, clients, categories, unassigned=kept - len(used), held_out=held_out, dropped=total - kept)


def _keep_categories(indexed: datasets.Dataset, spec: PartitionSpec) -> datasets.Dataset:
    assert spec.categories is not None
    present = sorted({str(name) for name in indexed.unique(spec.by)})
    unknown = [name for name in spec.categories if name not in present]
    if unknown:
        raise DataError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}: no row has "
            f"that {spec.by!r}; the data's categories are: {', '.join(present)}"
        )
    if not spec.categories:
        raise DataError("categories is empty: list at least one category to keep")
    wanted = set(spec.categories)
    labels = indexed[spec.by]
    return indexed.select([index for index, label in enumerate(labels) if str(label) in wanted])


def _split(indexed: datasets.Dataset, spec: PartitionSpec) -> list[datasets.Dataset]:
    """Disjoint client parts by flwr's partitioners."""
    if spec.scheme == Scheme.IID:
        indexed = indexed.shuffle(seed=spec.seed)  # flwr's IID partitioner takes contiguous shards
    partitioner = _partitioner(spec)
    partitioner.dataset = indexed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flwr warns on each Dirichlet redraw and on unused classes
            return [partitioner.load_partition(client) for client in range(spec.num_clients)]
    except ValueError as error:
        raise DataError(f"cannot make a {spec.scheme} partition with {spec}: {error}") from error


def _hold_out(
    indexed: datasets.Dataset, spec: PartitionSpec, rng: np.random.Generator
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(the rows left to the clients, the test rows held out of each category)."""
    labels = np.asarray([str(label) for label in indexed[spec.by]])
    test: list[int] = []
    for label in sorted(set(labels.tolist())):
        rows = rng.permutation(np.flatnonzero(labels == label))
        if spec.test_per_category is not None:
            if len(rows) <= spec.test_per_category:
                raise DataError(
                    f"category {label!r} has {len(rows)} rows: holding out test_per_category="
                    f"{spec.test_per_category} of them leaves none to train on"
                )
            take = spec.test_per_category
        else:
            take = min(max(round(len(rows) * spec.test_fraction), 1), len(rows) - 1) if len(rows) > 1 else 0
        test.extend(rows[:take].tolist())
    chosen = set(test)
    return indexed.select([i for i in range(len(indexed)) if i not in chosen]), indexed.select(sorted(test))


def _draw(
    pool: datasets.Dataset, spec: PartitionSpec, categories: tuple[str, ...], rng: np.random.Generator
) -> list[datasets.Dataset]:
    """``rows_per_client`` rows per client, drawn with replacement, weighted per category by the scheme.

    IID: every row alike. Dirichlet: a row weighs its category's share in the client's
    Dirichlet(alpha) draw. Pathological: client ``i`` holds categories ``i, i+1, ...`` (cyclically,
    ``classes_per_client`` of them), each row of those alike.
    """
    assert spec.rows_per_client is not None
    position = {name: index for index, name in enumerate(categories)}
    labels = np.asarray([position[str(label)] for label in pool[spec.by]])
    count = len(categories)
    if spec.scheme == Scheme.DIRICHLET:
        shares = rng.dirichlet(np.full(count, spec.alpha), size=spec.num_clients)
    elif spec.scheme == Scheme.PATHOLOGICAL:
        shares = np.zeros((spec.num_clients, count))
        for client in range(spec.num_clients):
            for offset in range(min(spec.classes_per_client, count)):
                shares[client, (client + offset) % count] = 1.0
    else:
        shares = np.ones((spec.num_clients, count))
    parts = []
    for client in range(spec.num_clients):
        weights = shares[client][labels]
        if weights.sum() <= 0:  # Dirichlet shares that underflow to zero
            weights = np.ones(len(labels))
        drawn = rng.choice(len(pool), size=spec.rows_per_client, replace=True, p=weights / weights.sum())
        parts.append(pool.select(drawn.tolist()))
    return parts


def _with_held_out(
    part: datasets.Dataset, held_out: datasets.Dataset, spec: PartitionSpec, client: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The client's rows for training and the held-out rows of the categories among them for testing."""
    if len(part) == 0:
        raise DataError(f"client {client} received no rows; use fewer clients or a larger alpha")
    held = set(str(label) for label in part[spec.by])
    labels = held_out[spec.by]
    return part, held_out.select([index for index, label in enumerate(labels) if str(label) in held])


def _train_test(
    part: datasets.Dataset, spec: PartitionSpec, rng: np.random.Generator, client: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if len(part) == 0:
        raise DataError(f"client {client} received no rows; use fewer clients or a larger alpha")
    labels = np.asarray(part[spec.by])
    test: list[int] = []
    for label in sorted(set(labels.tolist())):
        rows = rng.permutation(np.flatnonzero(labels == label))
        if spec.test_fraction > 0 and len(rows) > 1:
            take = min(max(round(len(rows) * spec.test_fraction), 1), len(rows) - 1)
            test.extend(rows[:take].tolist())
    chosen = set(test)
    train = [index for index in range(len(part)) if index not in chosen]
    return part.select(train), part.select(sorted(test))


def hold_out_validation(
    train: datasets.Dataset, fraction: float, seed: int, *, client: str
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """``(training rows, validation rows)``: a seeded ``fraction`` of ``train`` (at least one row) held out.

    The split is made after the partition, so a validation split changes no client's test rows. Rows
    drawn with replacement (``rows_per_client``) can repeat across the two, as they repeat within one.
    ``fraction`` 0: no validation split (``None``).
    """
    if fraction <= 0:
        return train, None
    take = max(round(len(train) * fraction), 1)
    if take >= len(train):
        raise DataError(
            f"{client} has {len(train)} training rows: data.validation_fraction = {fraction} leaves none to "
            "train on (use fewer clients, more data or a smaller validation_fraction)"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    held = sorted(int(index) for index in order[:take])
    rest = sorted(int(index) for index in order[take:])
    return train.select(rest), train.select(held)


def partition_table(partition: Partition) -> Table:
    """A rich table: rows per client and category, train/test sizes, and the heterogeneity."""
    spec = partition.spec
    title = f"{spec.scheme} partition of {spec.num_clients} clients by {spec.by!r} (seed {spec.seed})"
    if spec.scheme == Scheme.DIRICHLET:
        title += f", alpha {spec.alpha:g}"
    elif spec.scheme == Scheme.PATHOLOGICAL:
        title += f", {spec.classes_per_client} per client"
    if spec.rows_per_client is not None:
        title += f", {spec.rows_per_client} rows per client drawn with replacement"
    if spec.test_per_category is not None:
        title += f", {spec.test_per_category} test rows per category held out"
    table = Table(
        title=title,
        caption=f"heterogeneity (mean TV distance to the overall mix): {partition.heterogeneity():.3f}; "
        f"unassigned rows: {partition.unassigned}"
        + (f"; rows left out by category: {partition.dropped}" if partition.dropped else ""),
    )
    table.add_column("client", justify="right")
    for name in partition.categories:
        table.add_column(name, justify="right")
    for name in ("train", "test", "total"):
        table.add_column(name, justify="right", style="bold")
    for client, counts in zip(partition.clients, partition.counts(), strict=True):
        cells = [str(counts[name]) if counts[name] else "·" for name in partition.categories]
        table.add_row(str(client.client), *cells, str(len(client.train)), str(len(client.test)), str(client.size))
    return table


def plot_partition(partition: Partition, path: str | Path) -> Path:
    """Save a stacked bar chart of each client's rows per category as a PNG (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = partition.counts()
    figure = Figure(figsize=(max(4.0, 0.5 * len(counts) + 2), 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    clients = np.arange(len(counts))
    bottom = np.zeros(len(counts))
    for name in partition.categories:
        heights = np.array([client[name] for client in counts], dtype=float)
        axes.bar(clients, heights, bottom=bottom, label=name)
        bottom += heights
    axes.set_xlabel("client")
    axes.set_ylabel("rows")
    axes.set_xticks(clients)
    axes.set_title(f"{partition.spec.scheme} partition by {partition.spec.by}")
    axes.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    return target

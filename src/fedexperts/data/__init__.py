"""Instruction data: sources, prompt templates, tokenization, federated partitions, ExpertBench."""

from fedexperts.data.expertbench import ExpertBench, FederatedBench, Style, client_styles
from fedexperts.data.layout import (
    CAUSAL,
    IGNORE_INDEX,
    SEQ2SEQ,
    BatchLayout,
    batch_layout,
    join_example,
    split_example,
)
from fedexperts.data.partition import (
    ClientSplit,
    Partition,
    PartitionSpec,
    Scheme,
    partition,
    partition_table,
    plot_partition,
)
from fedexperts.data.sources import (
    PRESETS,
    SCHEMA,
    ColumnMapping,
    InstructionData,
    load_instructions,
    parse_mapping,
)
from fedexperts.data.templates import PromptTemplate, TemplateName, prompt_template
from fedexperts.data.tokenize import InstructionCollator, TokenizedData, tokenize_instructions

__all__ = [
    "CAUSAL",
    "IGNORE_INDEX",
    "PRESETS",
    "SCHEMA",
    "SEQ2SEQ",
    "BatchLayout",
    "ClientSplit",
    "ColumnMapping",
    "ExpertBench",
    "FederatedBench",
    "InstructionCollator",
    "InstructionData",
    "Partition",
    "PartitionSpec",
    "PromptTemplate",
    "Scheme",
    "Style",
    "TemplateName",
    "TokenizedData",
    "batch_layout",
    "client_styles",
    "join_example",
    "load_instructions",
    "parse_mapping",
    "partition",
    "partition_table",
    "plot_partition",
    "prompt_template",
    "split_example",
    "tokenize_instructions",
]

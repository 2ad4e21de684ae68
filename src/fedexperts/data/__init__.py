"""Instruction data: sources, prompt templates, tokenization, federated partitions, ExpertBench."""

from fedexperts.data.expertbench import ExpertBench, FederatedBench, Style, client_styles
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
from fedexperts.data.tokenize import (
    IGNORE_INDEX,
    InstructionCollator,
    TokenizedData,
    join_example,
    tokenize_instructions,
)

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "SCHEMA",
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
    "client_styles",
    "join_example",
    "load_instructions",
    "parse_mapping",
    "partition",
    "partition_table",
    "plot_partition",
    "prompt_template",
    "tokenize_instructions",
]

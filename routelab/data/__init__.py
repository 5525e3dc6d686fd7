"""Data for routelab: tokenizers, LM corpora, the ListOps generator, classification files, batches.

Nothing here downloads: the default LM corpus is the Python standard library's source (which also
gives two labelled tasks, ``stdlib-tokens`` and ``stdlib-packages``), ListOps is generated, and
Hugging Face datasets are read from the local cache unless explicitly allowed.
``tokenizers`` and ``datasets`` are optional (``pip install 'routelab[hf]'``).
"""

from routelab.data.batches import batch_seed, micro_batch, seed_everything, task_batches, task_seed, token_counts
from routelab.data.classification import (
    ClassificationData,
    classification_batch,
    classification_batches,
    classification_eval_batches,
    collate_classification,
    load_classification_data,
)
from routelab.data.corpus import (
    LMData,
    lm_eval_batches,
    load_lm_data,
    read_texts,
    sample_lm_batch,
    split_documents,
    stdlib_files,
)
from routelab.data.errors import DataError
from routelab.data.listops import (
    evaluate_listops,
    generate_listops,
    read_lra_tsv,
    write_lra_tsv,
)
from routelab.data.multitask import MultiTaskData, TaskCounter, draw_tasks, task_probabilities
from routelab.data.python_tags import TAG_NAMES, tag_bytes
from routelab.data.stdlib_tasks import PACKAGES, load_stdlib_packages, load_stdlib_tokens, split_files
from routelab.data.tasks import BUILTIN_SOURCES, check_source_task, load_labelled_data
from routelab.data.token_labels import (
    IGNORE_INDEX,
    TokenClassificationData,
    align_words,
    collate_token_labels,
    load_token_label_files,
)
from routelab.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    ListOpsTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "batch_seed",
    "micro_batch",
    "seed_everything",
    "task_batches",
    "task_seed",
    "token_counts",
    "MultiTaskData",
    "TaskCounter",
    "draw_tasks",
    "task_probabilities",
    "BUILTIN_SOURCES",
    "IGNORE_INDEX",
    "PACKAGES",
    "TAG_NAMES",
    "TokenClassificationData",
    "align_words",
    "check_source_task",
    "collate_token_labels",
    "load_labelled_data",
    "load_stdlib_packages",
    "load_stdlib_tokens",
    "load_token_label_files",
    "split_files",
    "tag_bytes",
    "BPETokenizer",
    "ByteTokenizer",
    "ClassificationData",
    "DataError",
    "HFTokenizer",
    "LMData",
    "ListOpsTokenizer",
    "Tokenizer",
    "classification_batch",
    "classification_batches",
    "classification_eval_batches",
    "collate_classification",
    "evaluate_listops",
    "generate_listops",
    "lm_eval_batches",
    "load_classification_data",
    "load_lm_data",
    "load_tokenizer",
    "read_lra_tsv",
    "read_texts",
    "sample_lm_batch",
    "split_documents",
    "stdlib_files",
    "write_lra_tsv",
]

"""The built-in data sources and the task each serves: a leaf (imports nothing of routelab), so
``routelab.config`` checks a task's source against it and the loaders (``routelab.data.tasks``) pick
by it, with the table kept beside the data it names.
"""

__all__ = ["BUILTIN_SOURCES"]

BUILTIN_SOURCES = {  # data.source -> the data.task it serves (re-exported by routelab.data)
    "stdlib": "lm",  # Python's own standard library source as an LM corpus
    "listops": "classification",  # generated ListOps expressions (Nangia and Bowman 2018)
    "stdlib-packages": "classification",  # which standard-library package a snippet comes from
    "stdlib-tokens": "token_classification",  # each byte of Python source tagged with its tokenize class
}

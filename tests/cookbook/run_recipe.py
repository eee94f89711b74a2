"""Runs a tinker-cookbook recipe, unmodified, against a self-hosted server with no hub access.

    python -m tinker_client.as_tinker tests/cookbook/run_recipe.py MODULE DATA.json key=value ...

The recipe's `datasets.load_dataset` gets the splits in DATA.json ({"train": [rows]}), and the
served base model's tokenizer is registered with the cookbook under the recipe's model_name:
the two things a real user's machine would fetch from the hub.
"""

import json
import runpy
import sys
from pathlib import Path

import datasets
import tinker
from tinker_cookbook.tokenizer_utils import register_tokenizer

module, data_file, *recipe_args = sys.argv[1:]
options = dict(arg.split("=", 1) for arg in recipe_args)
splits = {name: datasets.Dataset.from_list(rows) for name, rows in json.loads(Path(data_file).read_text()).items()}
datasets.load_dataset = lambda *args, **kwargs: datasets.DatasetDict(splits)


def served_tokenizer():
    service = tinker.ServiceClient(base_url=options["base_url"])
    return service.create_sampling_client(base_model=options["model_name"]).result().get_tokenizer()


register_tokenizer(options["model_name"], served_tokenizer)
sys.argv = [module, *recipe_args]
runpy.run_module(module, run_name="__main__", alter_sys=True)

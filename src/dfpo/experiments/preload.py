"""What every grid cell imports, imported once: ``dfpo bench noisy`` starts its cells from a fork server that has
loaded this module, so a cell begins training without paying the seconds of importing torch and transformers.

Import only: nothing here creates tensors or threads, so forking after it is safe.
"""

import matplotlib

matplotlib.use("Agg")  # cells write their run's curves.png without a display

import matplotlib.pyplot
import transformers.models.auto.modeling_auto
import transformers.models.auto.tokenization_auto
import transformers.models.llama.modeling_llama
import transformers.tokenization_utils_tokenizers  # noqa: F401

import dfpo.evaluate
import dfpo.experiments.noisy.cell
import dfpo.models
import dfpo.tasks
import dfpo.training.trainer  # noqa: F401

"""The shapes-world scorer packaged as a Hugging Face `evaluate` metric.

    import evaluate
    from flow_trl.toy.shapes_metric import METRIC_PATH

    metric = evaluate.load(METRIC_PATH)
    metric.add_batch(predictions=images, references=prompts)   # images [B, 3, H, W] in [0, 1]
    metric.compute()   # {"score": ..., "strict": ..., "quality": ..., "score/<tag>": ..., "strict/<tag>": ...}

`references` are shapes-world prompts; their metadata is parsed from the text. The figures are those of
:func:`flow_trl.toy.aggregate` over :func:`flow_trl.toy.score_batch`.
"""

import datasets
import evaluate
import numpy as np

from flow_trl.toy.scorer import aggregate, score_batch


METRIC_PATH = __file__

_DESCRIPTION = "GenEval-style partial-credit and strict accuracy of shapes-world images, per task family."
_KWARGS_DESCRIPTION = """
Args:
    predictions: images, each [3, H, W] with values in [0, 1].
    references: the shapes-world prompt of each image.
Returns:
    score, strict, quality, and score/<tag>, strict/<tag> for every family present.
"""


class ShapesMetric(evaluate.Metric):
    """GenEval-style scoring of generated shapes-world images against their prompts."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32")))),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        images = np.asarray(predictions, dtype=np.float32)
        return aggregate(score_batch(images, list(references)))

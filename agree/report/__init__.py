"""A self-contained HTML report of an evaluation or a training run.

    python -m agree.report directory=DIR [queries=6] [seed=0]

For an ``agree.evaluate`` output (DIR holds ``results.json``): the recall table per stage and
direction, recall@k curves for k = 1..20 (also saved as ``recall_curves.png``) and, for sampled
queries of both directions, the top 5 of every stage with thumbnails, the ground truth
highlighted and each item's rank change against the raw search. For an ``agree.train`` run
(``metrics.json``): the final validation metrics and their history from ``csv/metrics.csv``
(plot saved as ``val_metrics.png``). Writes ``DIR/report.html`` (images inlined as data URIs).

``load`` reads the outputs, ``plots`` draws, ``page`` makes the HTML (named so as not to shadow the
standard ``html`` it uses), ``write`` puts the two kinds of report together; ``table`` is the
plain-text recall table that ``agree.evaluate`` prints.
"""

from agree.report.load import ReportError
from agree.report.write import write_report

__all__ = ["ReportError", "write_report"]

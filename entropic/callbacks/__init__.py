"""Lightning callbacks: attention-entropy monitoring and entropy regularization for any LightningModule."""

from entropic.callbacks.monitor import AttentionEntropyMonitor
from entropic.callbacks.regularization import EntropyRegularization
from entropic.callbacks.run_record import RunRecord
from entropic.callbacks.throughput import TokenThroughputMonitor

__all__ = ["AttentionEntropyMonitor", "EntropyRegularization", "RunRecord", "TokenThroughputMonitor"]

"""`FedLossRecorder`: a `TrustRegionCallback` that records the losses it feeds."""

from keras_soaa import TrustRegionCallback


class FedLossRecorder(TrustRegionCallback):
    """`TrustRegionCallback` that also lists, in `fed`, each loss it observed.

    It reads the callback's per-batch `HandOverReport`, the same values the
    controller was fed on the device.
    """

    def __init__(self):
        super().__init__()
        self.fed = []

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.last_report.observed:
            self.fed.append(self.last_report.loss)

import os

# Workers refuse calls without the cluster secret (and `splitserve worker` refuses to start without
# one): every process a test starts inherits this one, and clients built from the environment present it.
os.environ.setdefault("SPLITSERVE_CLUSTER_SECRET", "tests-cluster-secret")

# Tests share two cores with the servers they start: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

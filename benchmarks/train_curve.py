"""Print one training run's loss, tokens/s and peak-memory curves (from its MLflow store) as JSON.

Usage: python3 benchmarks/train_curve.py RUN_DIR   (the --output-dir given to ./run_train.sh)
"""

import json
import sys

from mlflow.tracking import MlflowClient

run = sys.argv[1]
client = MlflowClient(f"sqlite:///{run}/mlflow.db")
found = client.search_runs(
    [client.get_experiment_by_name("qloraner").experiment_id], "attributes.run_name != 'eval-fine-tuned'"
)[0]
print(
    json.dumps(
        {
            k: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, k)]
            for k in ("loss", "tokens_per_s", "gpu_mem_gib")
        }
    )
)

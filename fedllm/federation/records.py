"""Every string key that crosses the wire, defined once."""

# RecordDict entries
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys (server -> client)
TASK_CONFIG = "task-config"
SERVER_ROUND = "server-round"  # set by Flower's strategies

# MetricRecord keys (client -> server)
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
EXAMPLES_SEEN = "examples-seen"
TRAIN_SECONDS = "train-seconds"
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
TOTAL_STEPS = "total-steps"
DP_HISTORY = "dp-history"  # flat [noise, rate, steps, noise, rate, steps, ...]

# node-local persistent state (context.state)
STATE_PRIVACY = "privacy-state"
STATE_HISTORY = "history-json"

# node_config keys set by the simulation engine
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

"""Every string key that crosses the wire, defined once."""

# RecordDict entries
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"  # ConfigRecord with a refusal's reason (strings cannot go in a MetricRecord)

# ConfigRecord keys (server -> client)
TASK_CONFIG = "task-config"
RUN_ID = "run-id"
SERVER_ROUND = "server-round"  # set by Flower's strategies

# MetricRecord keys (client -> server)
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key (sample-level DP and no DP)
UNIT_WEIGHT = "unit-weight"  # always 1: the uniform weighting client-level DP is calibrated for
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
EXAMPLES_SEEN = "examples-seen"
TRAIN_SECONDS = "train-seconds"
EPSILON = "epsilon"
EPSILON_CAP = "epsilon-cap"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
TOTAL_STEPS = "total-steps"
DP_HISTORY = "dp-history"  # flat [noise, rate, steps, noise, rate, steps, ...]
REFUSED = "refused"  # 1: the node trained nothing this round (see STATUS for why)
CAN_CONTINUE = "can-continue"  # 1: one more round at these settings stays within the node's cap
REPLAYED = "replayed"  # 1: the node resent the update it had already released for this round

# STATUS keys
REASON = "reason"

# node_config keys set by the simulation engine
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

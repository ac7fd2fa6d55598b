"""Every string key that crosses the wire, defined once."""

# RecordDict entries
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"  # ConfigRecord with a refusal's category (strings cannot go in a MetricRecord)

# ConfigRecord keys (server -> client)
TASK_CONFIG = "task-config"
RUN_ID = "run-id"
SERVER_ROUND = "server-round"  # set by Flower's strategies; in a pre-flight query, the first round still to play

# MetricRecord keys (client -> server): the releases are fedllm.node.release, their codec fedllm.federation.protocol
PARTITION_ID = "partition-id"
# sent only when the node's config declares them public (no DP covers them)
NUM_EXAMPLES = "num-examples"
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
# a pre-flight answer (fedllm.federation.preflight): the rounds still to play, and how many fit the node's cap
ROUNDS_PLANNED = "rounds-planned"
ROUNDS_AFFORDABLE = "rounds-affordable"
EPSILON_AFTER = "epsilon-after"  # the node's epsilon after the rounds it can afford (EPSILON: spent now)

# STATUS keys
CATEGORY = "category"  # budget, data or policy: all a refusal says besides epsilon numbers

# server-internal: the one metric the server leaves in a validated update for Flower's FedAvg
FEDAVG_WEIGHT = "fedavg-weight"

# node_config keys set by the simulation engine
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

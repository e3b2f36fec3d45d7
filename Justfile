# orderflow tasks; `just --list` shows them. The scripts work without `just` as well.

set positional-arguments

# list the recipes
default:
    @just --list

# build and run the demo against a fresh local broker (args go to `orderflow demo`)
demo *ARGS:
    scripts/demo.sh "$@"

# run the workspace tests against a fresh local broker (args go to `cargo test`)
test *ARGS:
    scripts/test.sh "$@"

# start a local broker in .broker: Kafka, or tansu with ORDERFLOW_BROKER=tansu (ORDERFLOW_BROKER_PORT / _KEEP apply)
broker-start:
    scripts/broker.sh start

# stop the local broker in .broker
broker-stop:
    scripts/broker.sh stop

# show whether the local broker in .broker runs, and its bootstrap address
broker-status:
    scripts/broker.sh status

# restart the local broker in .broker on the same port, keeping its data
broker-restart:
    scripts/broker.sh restart

# validate topology.toml
check:
    cargo run -p orderflow -- topology check topology.toml

# print the topology graph of topology.toml
graph:
    cargo run -p orderflow -- topology graph topology.toml

# format the workspace
fmt:
    cargo fmt --all

# lint the workspace
clippy:
    cargo clippy --workspace --all-targets -- -D warnings

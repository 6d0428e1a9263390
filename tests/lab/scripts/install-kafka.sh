#!/usr/bin/env bash
# Installs Apache Kafka (broker + Connect runtime), MongoDB's Kafka connector and a log4j2 SLF4J
# provider from Maven at the pinned versions into one lib directory in a cache outside the clone
# (resolved once per version set). Prints the lib directory on stdout; progress goes to stderr.
# Env: MREP_CACHE (default ~/.cache/mongo-replicator)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=../versions.env
source "$here/../versions.env"
CACHE="${MREP_CACHE:-$HOME/.cache/mongo-replicator}"
ROOT="$CACHE/kafka-$KAFKA_VERSION-mkc-$MONGO_KAFKA_CONNECT_VERSION"
LIB="$ROOT/lib"
# The rest of what the lib directory is made of; a change re-resolves it.
STAMP="slf4j $SLF4J_VERSION log4j $LOG4J_VERSION pom $(sha256sum "$here/../kafka/pom.xml" | cut -c1-16)"
installed() { [[ "$(cat "$ROOT/.done" 2>/dev/null)" == "$STAMP" ]]; }
if ! installed; then
  mkdir -p "$ROOT"
  exec 9>"$ROOT/.lock"
  flock 9
  if ! installed; then
    command -v mvn >/dev/null || { echo "install-kafka: mvn is required (apt-get install maven)" >&2; exit 1; }
    # The lab runs the jars with $JAVA_HOME/bin/java or java on the PATH; Kafka 4 needs 17 or newer.
    "${JAVA_HOME:+$JAVA_HOME/bin/}java" -version >/dev/null 2>&1 || { echo "install-kafka: a Java 17+ runtime is required (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
    echo "install-kafka: resolving Kafka $KAFKA_VERSION and mongo-kafka-connect $MONGO_KAFKA_CONNECT_VERSION from Maven (about a minute cold)" >&2
    rm -rf "$LIB"
    # Maven's own downloads stay in the cache too, so removing the cache removes everything.
    mvn -B -q -Dstyle.color=never -f "$here/../kafka/pom.xml" \
      -Dmaven.repo.local="$CACHE/maven-repo" \
      -Dkafka.version="$KAFKA_VERSION" \
      -Dmongo.kafka.connect.version="$MONGO_KAFKA_CONNECT_VERSION" \
      -Dslf4j.version="$SLF4J_VERSION" \
      -Dlog4j.version="$LOG4J_VERSION" \
      "org.apache.maven.plugins:maven-dependency-plugin:$MAVEN_DEPENDENCY_PLUGIN_VERSION:copy-dependencies" \
      -DincludeScope=runtime -DoutputDirectory="$LIB" >&2
    echo "$STAMP" >"$ROOT/.done"
  fi
fi
echo "$LIB"

"""librdkafka's built-in mock cluster through its C API, for tests and benchmarks.

A real Kafka-protocol broker in-process, with no download and no network: the C API (rather
than ``test.mock.num.brokers``) lets callers pre-create topics with many partitions and set
the consumer group's initial rebalance delay (3 s by default) to 0, so group joins take
milliseconds.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable, Mapping

import confluent_kafka as ck


def mock_cluster(
    topics: Mapping[str, int] | None = None, rebalance_delay_ms: int | None = 0
) -> tuple[str, Callable[[], None]] | None:
    """Start a one-broker mock cluster; ``topics`` maps name -> partitions to pre-create.

    Returns ``(bootstrap_servers, close)``, or None when the librdkafka bundled with
    confluent-kafka does not export the mock API (callers then fall back to
    ``test.mock.num.brokers``). ``rebalance_delay_ms=None`` keeps librdkafka's default.
    """
    libs = glob.glob(
        os.path.join(os.path.dirname(ck.__file__), "..", "confluent_kafka.libs", "librdkafka*.so*")
    )
    if not libs:
        return None
    try:
        lib = ctypes.CDLL(libs[0])
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        lib.rd_kafka_conf_new.restype = vp
        lib.rd_kafka_new.restype = vp
        lib.rd_kafka_conf_set.argtypes = [vp, cp, cp, cp, sz]
        lib.rd_kafka_new.argtypes = [ctypes.c_int, vp, cp, sz]
        lib.rd_kafka_mock_cluster_new.restype = vp
        lib.rd_kafka_mock_cluster_new.argtypes = [vp, ctypes.c_int]
        lib.rd_kafka_mock_cluster_bootstraps.restype = cp
        lib.rd_kafka_mock_cluster_bootstraps.argtypes = [vp]
        lib.rd_kafka_mock_topic_create.argtypes = [vp, cp, ctypes.c_int, ctypes.c_int]
        lib.rd_kafka_mock_group_initial_rebalance_delay_ms.argtypes = [vp, ctypes.c_int32]
        lib.rd_kafka_mock_cluster_destroy.argtypes = [vp]
        lib.rd_kafka_destroy.argtypes = [vp]
    except (OSError, AttributeError):
        return None
    err = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    lib.rd_kafka_conf_set(conf, b"log_level", b"0", err, 512)  # no "no bootstrap" warning
    rk = lib.rd_kafka_new(0, conf, err, 512)
    if not rk:
        return None
    mc = lib.rd_kafka_mock_cluster_new(rk, 1)

    def close() -> None:
        lib.rd_kafka_mock_cluster_destroy(mc)
        lib.rd_kafka_destroy(rk)

    if rebalance_delay_ms is not None:
        lib.rd_kafka_mock_group_initial_rebalance_delay_ms(mc, rebalance_delay_ms)
    for name, partitions in (topics or {}).items():
        if lib.rd_kafka_mock_topic_create(mc, name.encode(), partitions, 1) != 0:
            close()
            return None
    return lib.rd_kafka_mock_cluster_bootstraps(mc).decode(), close

"""What a benchmark ran on: machine, device and versions, recorded with every result."""

from __future__ import annotations

import importlib.util
import os
import platform

import kafka
import numpy as np
import torch


def crc32c_implementation() -> str:
    """kafka-python checksums every record batch it produces or fetches with the `crc32c` module when
    it can import it, else with its own pure-Python code (about 8 MB/s here): this decides Kafka figures."""
    return "crc32c module (C)" if importlib.util.find_spec("crc32c") else "pure Python (kafka-python's fallback)"


def machine(device: torch.device | None = None) -> dict[str, object]:
    info: dict[str, object] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["ram_gib"] = round(next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info.update(os=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), numpy=np.__version__, kafka_python=kafka.__version__,
                kafka_python_crc32c=crc32c_implementation())
    if importlib.util.find_spec("confluent_kafka"):
        import confluent_kafka

        info.update(confluent_kafka=confluent_kafka.__version__, librdkafka=confluent_kafka.libversion()[0])
    if device is not None and device.type == "cuda":
        info.update(cuda=torch.version.cuda, device=torch.cuda.get_device_name(),
                    device_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info

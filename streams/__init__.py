"""Event streams: a partitioned Redis Streams log that ``hytrec consume`` applies to the users' states once.

See docs/streams.md for the wire format, partitions and leases, and why every entry is applied exactly once.
"""

from hytrec.streams.partition import Partition, StreamLayout, partition_of
from hytrec.streams.producer import StreamProducer

__all__ = ["Partition", "StreamLayout", "StreamProducer", "partition_of"]

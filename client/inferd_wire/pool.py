"""inferd's own protobuf descriptor pool, for the Open Inference Protocol's generated messages.

tritonclient's generated code defines the same proto package, `inference`, in protobuf's
default pool, and one pool refuses two definitions of a symbol. Registering ours here lets both
be loaded in one process, with unchanged wire names. (The `inferd.v1` messages stay in the
default pool: their names are ours alone.)
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

"""Server reflection that describes only the services a port serves.

grpc's reflection servicer answers from the process's default descriptor pool, which holds every
generated file the process imported: a coordinator would describe `kvferry.v1.DecodeService` and its
methods, since coordinator.proto imports decode.proto and prefill.proto for their stats messages. The
pool built here holds the files of the served services and everything they import, with the services
of the imported files removed: their messages stay describable, their RPCs do not exist.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor


def served_pool(service_names: list[str]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool with the named services (full names, e.g. kvferry.v1.CoordinatorService), their
    files' dependencies, and no other service."""
    default = descriptor_pool.Default()
    served = set(service_names)
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        kept = [s for s in proto.service if f"{file.package}.{s.name}".lstrip(".") in served]
        del proto.service[:]
        proto.service.extend(kept)
        pool.Add(proto)
        added.add(file.name)

    for name in service_names:
        add(default.FindServiceByName(name).file)
    return pool

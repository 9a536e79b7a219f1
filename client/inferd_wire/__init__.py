"""What the inferd client and server share below both: the generated protobuf/gRPC modules
(`inferd_wire.proto`, from protos/) and the tensor wire codec (`inferd_wire.codec`)."""

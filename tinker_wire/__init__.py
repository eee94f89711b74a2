"""What the SDK and the server share beyond the generated protobuf code: the tensor codec. The
server imports this, never the SDK."""

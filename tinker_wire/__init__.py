"""What the SDK and the server share beyond the generated protobuf code: the tensor codec and the
session stream's batching. The server imports this, never the SDK."""

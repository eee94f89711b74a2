"""The gRPC front end: validates requests, acks them, routes results back."""

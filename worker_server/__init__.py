"""What both workers share: an engine on its loop thread behind a gRPC server."""

"""videoedit.v1: edit_pb2 (messages) and edit_pb2_grpc (EditService, AdminService stubs and servicers)."""

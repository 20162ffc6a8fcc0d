"""Planning and applying: pure plan building, rendering, execution over a connection, fleets."""

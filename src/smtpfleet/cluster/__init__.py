"""Node membership, takeover of dead nodes' deliveries, and self-fencing."""

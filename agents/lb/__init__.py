"""What an LB node runs besides its nftables dataplane: the BGP speaker of its VIPs (`bgp`)."""

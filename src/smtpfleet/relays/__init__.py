"""smtpfleet.relays"""

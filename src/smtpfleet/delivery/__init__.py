"""smtpfleet.delivery"""

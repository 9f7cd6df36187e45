//! Disque broker: ADDJOB/GETJOB/ACKJOB over RESP, a node list with failover, WORKING leases (in progress).

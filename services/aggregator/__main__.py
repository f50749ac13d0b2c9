from services.aggregator.service import main

main()

from services.pm.service import main

main()
